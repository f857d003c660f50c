"""Cost of guidance: the combine step of every CFG-family method, and the NFE saved by skipping branches.

(a) Combine time. Each method's ``combine`` on a batch of 16×4×128×128 float32 latents (an SDXL-sized batch of
16), against steer's plain CFG combine and against the matching diffusers guider's ``forward`` on the same tensors.
steer runs each method in the space its paper defines (default) and, where the paper's space differs from
diffusers' (raw model output), also in ``space="raw"``, which is the computation diffusers does. Median of
repeats after warm-up, one thread.

The model is a flow model (raw output = velocity), so diffusers' space and CFG-Zero*'s and MAMBO-G's paper space
coincide. steer's combine also returns x0 (the sampler's input), which diffusers leaves to its scheduler.

(b) NFE saved. On the exact Gaussian-mixture testbed (flow path, 25 dpmpp_2m steps), the network evaluations
per sample of CFG, a guidance interval and Adaptive Guidance, and how close each gets to the exact class
posterior.

    python benchmarks/guidance_overhead.py [--batch 16] [--size 128] [--repeats 20] [--threads 1]
"""
import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

import steer
from steer import guidance as g
from steer.guidance import Ctx
from steer.paths import get_path

warnings.filterwarnings("ignore")


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from the heap and never return them to the OS, so repeated 4 MB tensors
    reuse warm pages (as PyTorch's caching allocator does on GPU) and the timings measure arithmetic, not page
    faults. Returns False where this is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def timeit(fns: list, repeats: int, warmup: int = 3) -> list[float]:
    """Median ms of each function; the functions are timed in turn within every repeat, so they all see the same
    machine and allocator state (large CPU tensors make single timings noisy)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in ts]


def combine_table(batch: int, size: int, repeats: int) -> list[str]:
    shape = (batch, 4, size, size)
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(shape, generator=gen)
    u = 0.8 * c + 0.6 * torch.randn(shape, generator=gen)
    n = torch.randn(shape, generator=gen)
    x = torch.randn(shape, generator=gen)
    p = get_path("flow")
    t = 0.6
    ctx = Ctx.at(x, p, t, 3, None, "flow")
    # as in the loop: the model's raw outputs (flow velocities c, u, n) are converted to x0 once, and methods in
    # the model's own space read the raw tensors back through ctx.raw
    preds = {k: ctx.x0(v, "flow") for k, v in (("cond", c), ("uncond", u), ("negative", n))}
    ctx.raw.update({id(preds[k]): v for k, v in (("cond", c), ("uncond", u), ("negative", n))})

    try:
        from diffusers import guiders as dg
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer
    except ImportError:  # pragma: no cover
        dg = None

    def diffusers_fn(make):
        if dg is None:
            return None
        guider = make()
        guider.set_state(step=3, num_inference_steps=25, timestep=torch.tensor(600))
        if hasattr(guider, "momentum_buffer") and getattr(guider, "adaptive_projected_guidance_momentum", None):
            guider.momentum_buffer = MomentumBuffer(guider.adaptive_projected_guidance_momentum)
        return lambda: guider.forward(c, u)

    rows = [  # (label, steer method, steer raw-space variant or None, diffusers guider factory or None)
        ("cfg", g.cfg(7.5), None, lambda: dg.ClassifierFreeGuidance(guidance_scale=7.5)),
        ("interval cfg (inside)", g.cfg(7.5, sigma_lo=0.2, sigma_hi=5.0), None, None),
        ("cfg_rescale", g.cfg_rescale(7.5, 0.7), g.cfg_rescale(7.5, 0.7, space="raw"),
         lambda: dg.ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=0.7)),
        ("apg", g.apg(10.0, 0.0, 15.0, -0.5), g.apg(10.0, 0.0, 15.0, -0.5, space="raw"),
         lambda: dg.AdaptiveProjectedGuidance(guidance_scale=9.0, eta=0.0, adaptive_projected_guidance_rescale=15.0,
                                              adaptive_projected_guidance_momentum=-0.5,
                                              use_original_formulation=True)),
        ("cfg_zero_star", g.cfg_zero_star(4.0, 0), None,
         lambda: dg.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=0)),
        ("tcfg", g.tcfg(7.5), g.tcfg(7.5, space="raw"),
         lambda: dg.TangentialClassifierFreeGuidance(guidance_scale=7.5)),
        ("fdg", g.fdg(5.0, 10.0), None, lambda: dg.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0])),
        ("mambo", g.mambo(10.0, 8.0), None, None),  # diffusers' fails on 4-D latents (tests/test_parity_guiders.py)
        ("adaptive", g.adaptive(7.5, 0.999), None, None),
        ("cfgpp", g.cfgpp(0.6), None, None),
        ("tag", g.tag(7.5, 1.05), None, None),
        ("cfg + dynamic_threshold", g.parse("cfg(scale=7.5) + dynamic_threshold(percentile=0.995)"), None, None),
        ("perp_neg", g.perp_neg(7.5, 1.0), None, None),
    ]
    cfg = g.cfg(7.5)
    lines = [f"Combine step on {batch}×4×{size}×{size} float32 latents, median ms "
             f"({torch.get_num_threads()} thread(s), warm allocator).",
             "", "| method | steer (paper's space) ms | × steer CFG | steer (diffusers' space) ms | diffusers ms | "
             "steer / diffusers |", "|---|---|---|---|---|---|"]
    for label, method, raw, make in rows:
        fns = [lambda: cfg.combine(preds, ctx), lambda: method.combine(preds, ctx)]
        if raw is not None:
            fns.append(lambda: raw.combine(preds, ctx))
        fn = diffusers_fn(make) if make is not None else None
        if fn is not None:
            fns.append(fn)
        times = timeit(fns, repeats)
        base, t_s = times[0], times[1]
        t_raw = times[2] if raw is not None else None
        t_d = times[-1] if fn is not None else None
        same = t_raw if t_raw is not None else t_s
        lines.append(f"| {label} | {t_s:.2f} | {t_s / base:.2f} | {'' if t_raw is None else f'{t_raw:.2f}'} | "
                     f"{'n/a' if t_d is None else f'{t_d:.2f}'} | {'' if t_d is None else f'{same / t_d:.2f}'} |")
        print(lines[-1], flush=True)
    return lines


def nfe_table() -> list[str]:
    from steer.testbeds import gmm

    mix = gmm.toy(dim=2)
    den = mix.denoiser("flow", "flow")
    labels = torch.arange(2000) % mix.n_classes
    lines = ["", "NFE per sample at equal steps (exact 2-D mixture, flow path, 25 dpmpp_2m steps, 2,000 samples):", "",
             "| guidance | NFE / sample | saved vs CFG | mean log p(c \\| x0) |", "|---|---|---|---|"]
    ref = None
    for spec in ["cfg(scale=3)", "cfg(scale=3, sigma_lo=0.28, sigma_hi=5.42)", "adaptive(scale=3, threshold=0.99)",
                 "adaptive(scale=3, threshold=0.999)", "cfg(scale=3, schedule='linear')", None]:
        res = steer.sample(den, cond=labels, guidance=spec, steps=25, seed=0, return_info=True)
        logp = float(mix.classifier_log_probs(res.x, 0.0, "flow").gather(1, labels[:, None]).mean())
        ref = res.nfe if ref is None else ref
        lines.append(f"| `{spec or 'none (conditional only)'}` | {res.nfe} | {1 - res.nfe / ref:.0%} | {logp:.4f} |")
        print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "guidance_overhead.md",
                    help="where to write (default bench-out/, outside the committed tree; "
                         "benchmarks/out/ holds the committed reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warm = keep_freed_memory()
    print(f"warm allocator: {warm}")
    with torch.no_grad():
        lines = combine_table(args.batch, args.size, args.repeats) + nfe_table()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
