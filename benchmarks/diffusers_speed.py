"""Seconds per image at equal NFE: ``steer.integrations.diffusers.sample`` against the diffusers pipeline itself.

Both run the same network, prompt, scheduler grid (DPMSolverMultistep ↔ steer's dpmpp_2m), step count and batch,
from the prompt to the final latents (``output_type="latent"``: text encoding and sampling, no VAE decode), and
every guidance branch is batched into one forward pass per step on both sides. Rows:

- CFG: steer ``cfg(w)`` against the pipeline's ``guidance_scale=w`` (2 NFE per step);
- APG: steer ``apg(scale=w)`` (paper defaults η = 0, r = 15, β = −0.5) against the pipeline's CFG at the same
  NFE (the standard pipelines have no APG; the cost a diffusers user pays per image at that NFE);
- CFG + PAG: steer ``cfg(w) + pag(s + 1)`` against diffusers' ``StableDiffusionPAGPipeline`` (``pag_scale=s``,
  the middle block; 3 NFE per step). This row needs steer's attention hooks for diffusers
  (``steer.integrations.diffusers_attention``); without them the script says so and leaves the row out.

Default (CPU): the tiny random-weight SD pipeline of ``steer.integrations.tiny_diffusers`` at 64×64 (32×32
latents). ``--full-size`` (a CUDA GPU): a random-weight UNet with SD1.5's configuration (diffusers' defaults with
768-d cross-attention; 860M parameters), SD1.5's VAE and CLIP text-encoder configurations, float16, at batch 1
and 8, also recording peak GPU memory (``torch.cuda.max_memory_allocated``) of each side. Goals: steer ≤ 1.0× the
pipeline's time and ≤ 1.05× its peak memory. Median of ``--repeats`` runs after one warm-up, the two sides
alternating; one CPU thread unless ``--threads``.

    python benchmarks/diffusers_speed.py [--steps 20] [--repeats 5] [--out bench-out/diffusers_speed.md]
    python benchmarks/diffusers_speed.py --full-size [--batches 1 8] [--steps 25]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from steer.integrations import diffusers as steer_diffusers, tiny_diffusers

warnings.filterwarnings("ignore")

PROMPT = "a photograph of an astronaut riding a horse"
CFG_SCALE, PAG_SCALE = 7.5, 3.0


def hooks_available() -> bool:
    return importlib.util.find_spec("steer.integrations.diffusers_attention") is not None


def tiny_pipeline():
    import diffusers

    pipe = tiny_diffusers.build("sd", seed=0)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def full_size_pipeline(device: str, dtype: torch.dtype):
    """Random weights in SD1.5's configurations (nothing downloaded)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the rest: diffusers' defaults
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                                  sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(tiny_diffusers.SD_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_diffusers.clip_tokenizer(),
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def rows(pipe, pag_pipe):
    """(name, NFE per step, steer call, pipeline call) for each row."""
    out = [("CFG", 2, f"cfg(scale={CFG_SCALE})", {"guidance_scale": CFG_SCALE}),
           ("APG", 2, f"apg(scale={CFG_SCALE})", {"guidance_scale": CFG_SCALE})]
    if pag_pipe is not None:
        out.append(("CFG + PAG", 3, f"cfg(scale={CFG_SCALE}) + pag(scale={PAG_SCALE + 1})",
                    {"guidance_scale": CFG_SCALE, "pag_scale": PAG_SCALE}))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, repeats: int) -> tuple[list[float], int]:
    """Wall seconds of each repeat and the peak memory (bytes, CUDA only) of one run."""
    times = []
    peak = 0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_allocated(device))
    return times, peak


def run(pipe, batches, steps: int, repeats: int, height: int, width: int) -> tuple[list[dict], str]:
    device = pipe._execution_device
    note = ""
    pag_pipe = None
    if hooks_available():
        from diffusers import StableDiffusionPAGPipeline

        pag_pipe = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
        pag_pipe.set_progress_bar_config(disable=True)
    else:
        note = ("The CFG + PAG row is left out: steer's attention hooks for diffusers "
                "(steer.integrations.diffusers_attention) are not in this build, so steer cannot run PAG on a "
                "diffusers UNet yet.")
    results = []
    for batch in batches:
        for name, nfe_step, spec, call in rows(pipe, pag_pipe):
            target = pag_pipe if "pag_scale" in call else pipe

            def diffusers_fn():
                target(PROMPT, num_inference_steps=steps, num_images_per_prompt=batch, height=height, width=width,
                       output_type="latent", generator=torch.Generator().manual_seed(0), **call)

            def steer_fn():
                steer_diffusers.sample(pipe, PROMPT, guidance=spec, solver="dpmpp_2m", steps=steps, seed=0,
                                       num_images_per_prompt=batch, height=height, width=width, output_type="latent")

            diffusers_fn(), steer_fn()  # warm-up
            t_d, t_s, m_d, m_s = [], [], 0, 0
            for _ in range(repeats):  # alternate the two sides so they see the same machine state
                ts, ms = measure(steer_fn, device, 1)
                td, md = measure(diffusers_fn, device, 1)
                t_s += ts
                t_d += td
                m_s, m_d = max(m_s, ms), max(m_d, md)
            s, d = statistics.median(t_s) / batch, statistics.median(t_d) / batch
            results.append({"row": name, "batch": batch, "nfe": nfe_step * steps, "steer": s, "diffusers": d,
                            "min_steer": min(t_s) / batch, "min_diffusers": min(t_d) / batch,
                            "mem_steer": m_s, "mem_diffusers": m_d})
            mem = f"  memory ×{m_s / m_d:.3f}" if m_d else ""
            print(f"{name:<10} batch {batch}: steer {s:.4f} s/image, diffusers {d:.4f} s/image, ×{s / d:.3f} "
                  f"(fastest runs ×{min(t_s) / min(t_d):.3f}){mem}", flush=True)
    return results, note


def table(results, gpu: bool) -> str:
    head = ("| guidance | batch | NFE / image | steer s/image | diffusers s/image | steer / diffusers | "
            "fastest runs: steer / diffusers |")
    sep = "|---|---|---|---|---|---|---|"
    if gpu:
        head += " steer peak GiB | diffusers peak GiB | memory ratio |"
        sep += "---|---|---|"
    lines = [head, sep]
    for r in results:
        line = (f"| {r['row']} | {r['batch']} | {r['nfe']} | {r['steer']:.4f} | {r['diffusers']:.4f} | "
                f"{r['steer'] / r['diffusers']:.3f} | {r['min_steer'] / r['min_diffusers']:.3f} |")
        if gpu:
            line += (f" {r['mem_steer'] / 2**30:.2f} | {r['mem_diffusers'] / 2**30:.2f} | "
                     f"{r['mem_steer'] / r['mem_diffusers']:.3f} |")
        lines.append(line)
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full-size", action="store_true", help="SD1.5-sized random-weight UNet in float16 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="solver steps (default 20 on CPU, 25 full size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="images per call (default 1; full: 1 8)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU, where "
                    "several threads on a shared machine make small ops ten times slower; torch's on a GPU)")
    ap.add_argument("--device", default=None, help="full size: torch device (default cuda; another device only "
                    "checks that the script runs, and its timings are no goal)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default 64 tiny, 512 full size)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/diffusers_speed.md"))
    args = ap.parse_args()
    if args.threads or not args.full_size:
        torch.set_num_threads(args.threads or 1)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    cpu = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if args.full_size:
        where = args.device or "cuda"
        if where.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("--full-size needs a CUDA GPU (a random-weight SD1.5-sized UNet in float16)")
        dtype = torch.float16 if where.startswith("cuda") else torch.float32
        pipe = full_size_pipeline(where, dtype)
        steps, batches, size = args.steps or 25, args.batches or [1, 8], args.size or 512
        device = torch.cuda.get_device_name() if where.startswith("cuda") else cpu
        what = (f"random-weight SD1.5-sized UNet (860M parameters), {str(dtype).removeprefix('torch.')}, "
                f"{size}×{size} ({size // 8}×{size // 8} latents)")
    else:
        pipe = tiny_pipeline()
        steps, batches, size = args.steps or 20, args.batches or [1], args.size or 64
        device = cpu
        what = (f"tiny random-weight SD pipeline of steer.integrations.tiny_diffusers, float32, {size}×{size} "
                f"({size // 2}×{size // 2} latents)")
    pipe.set_progress_bar_config(disable=True)
    results, note = run(pipe, batches, steps, args.repeats, size, size)
    gpu = pipe._execution_device.type == "cuda"
    date = datetime.date.today().isoformat()
    text = (f"# steer vs the diffusers pipeline: seconds per image at equal NFE\n\n"
            f"{date} · {device} · torch {torch.__version__} · diffusers {diffusers.__version__}\n\n"
            f"Model: {what}; {steps} DPM-Solver++(2M) steps (steer dpmpp_2m on the pipeline's own grid), prompt to "
            f"final latents, median of {args.repeats} runs per side after a warm-up, the sides alternating (and "
            f"the ratio of each side's fastest run, less sensitive to other load on a shared machine). APG's "
            f"pipeline column is the pipeline's CFG at the same NFE (the standard pipelines have no APG).\n\n"
            f"{table(results, gpu)}\n")
    if note:
        text += f"\n{note}\n"
    if args.full_size:
        text += "\nGoals: steer / diffusers ≤ 1.0 in time and ≤ 1.05 in peak memory.\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
