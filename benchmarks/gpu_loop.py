"""steer's sampling loop against a hand-written diffusers loop on an SD1.5-shaped UNet, on the GPU (issue 7).

What is measured. One text-to-image sampling call — 25 DPM-Solver++(2M) steps with classifier-free guidance at
scale 7.5 — on a ``diffusers.UNet2DConditionModel`` built from Stable Diffusion 1.5's configuration (860M
parameters, random weights from a fixed seed) in float16, with 4×64×64 latents and random text embeddings
[B, 77, 768], at batch 1 and 8 (the UNet sees 2 and 16):

- diffusers: the loop a pipeline runs, under ``torch.no_grad()`` as pipelines do: ``set_timesteps``; for each
  timestep one UNet call on ``cat([x, x])`` with ``cat([uncond, cond])``, ``ε = ε_u + 7.5 (ε_c − ε_u)``, one
  ``DPMSolverMultistepScheduler.step``.
- steer: ``steer.sample(model, noise=..., cond=..., uncond=..., guidance=spec, solver="dpmpp_2m",
  timesteps=grid)``, the UNet wrapped by ``steer.denoiser(fn, path="vp-scaled-linear", prediction="eps")``, for
  the specs ``cfg``, ``apg``, ``cfg_rescale``, ``cfg_zero_star`` (zero-init off, so its NFE equals CFG's) and
  ``tcfg``, all at scale 7.5. The call is deliberately *not* wrapped in ``torch.no_grad()`` and the UNet's
  parameters require grad (the default): this measures that steer turns autograd off itself. The report says
  whether autograd was on inside the model calls.

Both sides run the same network, noise and time grid: the scheduler is SD1.5's (``scaled_linear`` β from 0.00085
to 0.012, 1000 training steps, ε-prediction) as ``make_scheduler("dpmpp_2m", "vp-scaled-linear")`` builds it
(order 2, ``dpmsolver++``, midpoint, ``trailing`` spacing, final step to σ = 0), and steer gets its timesteps τ as
continuous times ``t = (τ + 1)/1000`` plus the final t = 0 (checked against ``scheduler_levels``). steer hands the
model t in float32, so the wrapper rounds τ = 1000·t − 1 to the integer timestep diffusers passes; every τ of this
grid is an integer.

How. Each variant is called once first (errors such as out-of-memory are caught and reported, the other variants
go on; the final latents of steer's CFG are compared with diffusers'), then warmed up; then, on CUDA, one call
each for peak memory (``reset_peak_memory_stats`` before, ``max_memory_allocated`` after; "start" is the memory
allocated before the call: weights and inputs) and one for host-device synchronisations (the warnings of
``torch.cuda.set_sync_debug_mode("warn")`` during the call, counted per step). Then the timed calls, the variants
interleaved in every repeat so they share the machine's state, ``torch.cuda.synchronize()`` before and after each
whole call; the median wall time is reported.

Goals (issue 7): steer CFG / diffusers ≤ 1.0; APG, rescale, CFG-Zero*, TCFG each ≤ 1.02× steer's CFG; peak memory
≤ 1.05× diffusers'.

Writes a markdown table to stdout and ``--out`` (default bench-out/gpu_loop.md), and the raw numbers to the
same name with ``.json``. On an H200 the whole run should take one to two minutes.

    python benchmarks/gpu_loop.py [--batches 1 8] [--steps 25] [--repeats 7] [--warmup 3] [--out PATH]
    python benchmarks/gpu_loop.py --tiny --device cpu --dtype float32 --threads 1 --steps 5 --repeats 1 \\
        --warmup 0 --out /tmp/gpu_loop.md   # check the script on the CPU, about 20 s
"""
import argparse
import gc
import json
import platform
import statistics
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

import steer
from steer.integrations.diffusers_schedulers import make_scheduler, scheduler_levels

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
PATH = "vp-scaled-linear"  # SD1.5: scaled_linear β from 0.00085 to 0.012, T = 1000
TOKENS = 77
METHODS = {  # label -> guidance spec; {w} is the scale
    "cfg": "cfg(scale={w})",
    "apg": "apg(scale={w})",
    "cfg_rescale": "cfg_rescale(scale={w})",
    "cfg_zero_star": "cfg_zero_star(scale={w}, zero_init_steps=0)",
    "tcfg": "tcfg(scale={w})",
}
GOALS = {"steer_cfg/diffusers": 1.0, "method/steer_cfg": 1.02, "peak/diffusers": 1.05}


def build_unet(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The UNet with random weights from ``seed`` (built on ``device`` directly), parameters requiring grad."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules of pretrained checkpoints; there are none
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval()


def steer_model(unet, seen: dict):
    """The UNet as a steer Denoiser: steer's t in [0, 1] becomes diffusers' timestep, ``cond`` the text embeddings.

    ``seen["autograd"]`` records whether autograd was ever on inside a model call."""
    path = steer.get_path(PATH)

    def unet_eps(x, t, cond):
        seen["autograd"] = seen["autograd"] or torch.is_grad_enabled()
        timestep = path.timestep(t).round()  # undo t's float rounding: every τ of this grid is an integer
        return unet(x, timestep, encoder_hidden_states=cond).sample

    return steer.denoiser(unet_eps, path=path, prediction="eps")


def time_grid(scheduler, steps: int) -> torch.Tensor:
    """The scheduler's grid as steer times: ``t = (τ + 1)/T`` for each timestep τ, then t = 0 (σ = 0)."""
    scheduler.set_timesteps(steps)
    tau = scheduler.timesteps.double().cpu()
    grid = torch.cat([(tau + 1) / scheduler.config.num_train_timesteps, tau.new_zeros(1)])
    _, levels = scheduler_levels(scheduler, PATH)  # the same grid read from the scheduler's noise levels
    assert levels.shape == grid.shape and torch.allclose(levels, grid, rtol=0, atol=1e-6), (levels, grid)
    return grid


@torch.no_grad()
def diffusers_sample(unet, scheduler, noise, cond, uncond, steps: int, scale: float):
    """The canonical diffusers pipeline loop with classifier-free guidance."""
    scheduler.set_timesteps(steps, device=noise.device)
    emb = torch.cat([uncond, cond])
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)  # the identity for DPM-Solver
        eps_u, eps_c = unet(model_input, t, encoder_hidden_states=emb).sample.chunk(2)
        x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
    return x


def make_variants(unet, noise, cond, uncond, args, seen: dict) -> dict:
    """name -> a function running one whole sampling call and returning the final latents."""
    scheduler = make_scheduler("dpmpp_2m", PATH, "eps")
    grid = time_grid(scheduler, args.steps)
    model = steer_model(unet, seen)

    def steer_call(spec: str):
        def run(**extra):  # no torch.no_grad() here: steer has to turn autograd off itself
            return steer.sample(model, noise=noise, cond=cond, uncond=uncond, guidance=spec, solver="dpmpp_2m",
                                steps=args.steps, timesteps=grid, **extra)
        return run

    variants = {"diffusers": lambda: diffusers_sample(unet, scheduler, noise, cond, uncond, args.steps, args.scale)}
    for label, spec in METHODS.items():
        variants[f"steer {label}"] = steer_call(spec.format(w=args.scale))
    variants["diffusers (again)"] = variants["diffusers"]  # a control for the position in each round
    return variants


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_call(name: str, fn, device: torch.device) -> dict:
    """Call a variant once: its output and NFE, or the error that stopped it."""
    try:
        if name.startswith("steer"):
            res = fn(return_info=True)
            return {"x": res.x, "nfe": res.nfe}
        return {"x": fn()}
    except Exception as e:  # out of memory, non-finite values, …: report it and go on with the other variants
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    free_memory(device)
    return {"error": error}


def peak_memory(fn, device: torch.device) -> tuple[int, int]:
    """(bytes allocated before the call, peak bytes allocated during it)."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return start, torch.cuda.max_memory_allocated(device)


def count_syncs(fn, device: torch.device) -> int:
    """Host-device synchronisations during one call, as reported by CUDA's sync debug mode."""
    torch.cuda.synchronize(device)
    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def kernel_profile(fn, top: int = 8) -> dict:
    """GPU time of one call by kernel (torch.profiler): the total, the kernel count and the largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    rows = sorted(((e.key, e.count, e.self_device_time_total) for e in events), key=lambda r: -r[2])
    return {"total_ms": sum(r[2] for r in rows) / 1e3, "kernels": sum(r[1] for r in rows),
            "top": [(k[:60], c, round(t / 1e3, 2)) for k, c, t in rows[:top]]}


def interleaved_times(fns: dict, repeats: int, sync) -> dict[str, list[float]]:
    """Wall times (s) of whole calls, every function once per round so that all see the same machine state."""
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:  # rotated: no variant always goes first
            fn = fns[name]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {1e3 * ts[-1]:.0f} ms" for n, ts in times.items()), flush=True)
    return times


def bench_batch(unet, config: dict, batch: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(args.seed + batch)
    size, width = config["sample_size"], config["cross_attention_dim"]
    noise = torch.randn(batch, config["in_channels"], size, size, generator=gen).to(device, dtype)
    cond = torch.randn(batch, TOKENS, width, generator=gen).to(device, dtype)
    uncond = torch.randn(batch, TOKENS, width, generator=gen).to(device, dtype)
    seen = {"autograd": False}
    variants = make_variants(unet, noise, cond, uncond, args, seen)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    rows = {}

    print(f"batch {batch}: first calls", flush=True)
    outputs = {}
    for name, fn in variants.items():
        res = first_call(name, fn, device)
        outputs[name] = res.pop("x", None)
        rows[name] = {"nfe": 2 * args.steps if name.startswith("diffusers") else None, **res}
        print(f"  {name}: {res.get('error', 'ok')}", flush=True)
    agreement = None
    if outputs["diffusers"] is not None and outputs["steer cfg"] is not None:
        ref = outputs["diffusers"].float()
        agreement = float((outputs["steer cfg"].float() - ref).abs().max() / ref.abs().max())
    del outputs
    free_memory(device)
    live = {name: fn for name, fn in variants.items() if "error" not in rows[name]}

    print(f"batch {batch}: warm-up ({args.warmup} rounds)", flush=True)
    for _ in range(args.warmup):
        for fn in live.values():
            fn()
    if cuda:
        print(f"batch {batch}: peak memory and synchronisations", flush=True)
        for name, fn in live.items():
            rows[name]["start_bytes"], rows[name]["peak_bytes"] = peak_memory(fn, device)
        for name, fn in live.items():
            rows[name]["syncs"] = count_syncs(fn, device)
    print(f"batch {batch}: {args.repeats} timed rounds", flush=True)
    for name, times in interleaved_times(live, args.repeats, sync).items():
        rows[name].update(times_s=times, median_s=statistics.median(times))
    if cuda and args.profile:
        for name in ("diffusers", "steer cfg"):
            rows[name]["kernels"] = kernel_profile(live[name])
    return {"batch": batch, "autograd_in_steer_model": seen["autograd"],
            "steer_cfg_vs_diffusers_max_rel_diff": agreement, "variants": rows}


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _cell(value, fmt: str, goal: float | None = None) -> str:
    if value is None:
        return "—"
    text = format(value, fmt)
    return text if goal is None else f"{text} {'✓' if value <= goal else '✗'}"


def table(result: dict, steps: int) -> list[str]:
    rows = result["variants"]
    base, cfg = rows["diffusers"], rows["steer cfg"]
    grad = result["autograd_in_steer_model"]
    diff = result["steer_cfg_vs_diffusers_max_rel_diff"]
    lines = [f"### batch {result['batch']}", "",
             f"autograd inside steer's model calls: {'ON ✗' if grad else 'off ✓'} · final latents, steer CFG vs "
             f"diffusers: max |Δ| / max |x| = {_cell(diff, '.1e')}", "",
             "| variant | NFE | median (ms) | per step (ms) | vs diffusers | vs steer CFG (goal ≤ "
             f"{GOALS['method/steer_cfg']}) | peak (GiB) | peak − start (MiB) | peak vs diffusers (goal ≤ "
             f"{GOALS['peak/diffusers']}) | syncs / step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | {row.get('nfe') or '—'} | failed: {row['error']} |  |  |  |  |  |  |  |")
            continue
        t = row["median_s"]
        vs_diffusers = _ratio(t, base.get("median_s"))
        vs_cfg = _ratio(t, cfg.get("median_s"))
        peak, start = row.get("peak_bytes"), row.get("start_bytes")
        cells = [
            name, str(row["nfe"]), f"{1e3 * t:.1f}", f"{1e3 * t / steps:.2f}",
            _cell(vs_diffusers, ".3f", GOALS["steer_cfg/diffusers"] if name == "steer cfg" else None),
            ("—" if name.startswith("diffusers") or name == "steer cfg"
             else _cell(vs_cfg, ".3f", GOALS["method/steer_cfg"])),
            _cell(None if peak is None else peak / 2**30, ".2f"),
            _cell(None if peak is None else (peak - start) / 2**20, ".0f"),
            "—" if name == "diffusers" else _cell(_ratio(peak, base.get("peak_bytes")), ".3f",
                                                  GOALS["peak/diffusers"]),
            _cell(None if row.get("syncs") is None else row["syncs"] / steps, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in rows.items():
        if "kernels" in row:
            k = row["kernels"]
            lines.append(f"\n{name}: GPU kernel time {k['total_ms']:.1f} ms in {k['kernels']} kernels; largest: "
                         + "; ".join(f"{n} ×{c} {t} ms" for n, c, t in k["top"]))
    return lines + [""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up calls per variant after the first call")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (32/64 channels, 16×16), to check the script")
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "gpu_loop.md")
    ap.add_argument("--profile", action="store_true", help="also record GPU time by kernel of diffusers and steer CFG")
    args = ap.parse_args()
    import diffusers

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    config = TINY_UNET if args.tiny else SD15_UNET
    started = time.perf_counter()
    unet = build_unet(config, device, dtype, args.seed)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet built: {n_params / 1e6:.1f}M parameters ({time.perf_counter() - started:.0f} s)", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")

    results = [bench_batch(unet, config, b, args, device, dtype) for b in args.batches]
    elapsed = time.perf_counter() - started
    lines = [
        f"## steer vs diffusers: the sampling loop on an SD1.5-shaped UNet ({datetime.now():%Y-%m-%d %H:%M})", "",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, {device_name}, {args.dtype}",
        f"- UNet2DConditionModel, {'tiny' if args.tiny else 'SD1.5'} config, random weights (seed {args.seed}), "
        f"{n_params / 1e6:.1f}M parameters, latents 4×{config['sample_size']}×{config['sample_size']}, "
        f"text embeddings [B, {TOKENS}, {config['cross_attention_dim']}]",
        f"- DPMSolverMultistepScheduler / steer `dpmpp_2m` ({PATH}, ε, trailing spacing), {args.steps} steps, "
        f"guidance scale {args.scale}; median of {args.repeats} timed calls after {args.warmup + 1} untimed, "
        f"variants interleaved; whole run {elapsed:.0f} s",
        f"- goals: steer CFG / diffusers ≤ {GOALS['steer_cfg/diffusers']}; each method ≤ "
        f"{GOALS['method/steer_cfg']}× steer CFG; peak memory ≤ {GOALS['peak/diffusers']}× diffusers'",
        "",
    ]
    for result in results:
        lines += table(result, args.steps)
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    meta = {"date": datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": device_name, "dtype": args.dtype, "tiny": args.tiny,
            "unet_config": config, "parameters": n_params, "steps": args.steps, "scale": args.scale,
            "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed, "goals": GOALS,
            "methods": {k: v.format(w=args.scale) for k, v in METHODS.items()}, "elapsed_s": elapsed}
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"\nwritten to {args.out} and {json_path}", flush=True)


if __name__ == "__main__":
    main()
