"""FK correctors against exact targets: what ``steer.smc(method="fkc")`` samples, and how that depends on K.

Each case runs G independent conditions of K particles (seed g for condition g), the reverse SDE
(dpmpp_2m_sde, η = 1) on a ``--steps`` Karras grid (σ̄ from 80 to 0.002, then 0) in float64, resampling a condition when
its ESS falls below K/2. A statistic is estimated per condition from its weighted population, then averaged over
the conditions; ± is the standard error over the conditions (their spread / √G), which includes the Monte Carlo
error of SMC. "unweighted SDE" is the same sampler never resampled and read without weights (the SDE with the
combined score alone; CFG's SDE in the CFG cases). Exact values: closed form for the Gaussian pair
(cond N(1, 0.5²), uncond N(0, 1)); rejection sampling from ``p(x|c)`` with acceptance ``p(c|x)^(w−1)``
(400,000 samples) for the 2-D mixture ``steer.testbeds.gmm.toy()`` (3 classes × 2 anisotropic components).
Writes bench-out/fkc_exact.md (``--out``).

A last table runs FKC's weights on the w = 3 mixture as plain importance sampling (no resampling, ``--importance``
particles, three seeds), to show how heavy-tailed they are (ESS).

    python benchmarks/fkc_exact.py [--steps 200] [--groups 32] [--particles 8 32 256 1024] [--importance 100000]
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

import steer
from steer.testbeds import gmm as G


def karras(path, n):
    sb = (80 ** (1 / 7) + torch.arange(n, dtype=torch.float64) / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    return torch.cat([path.t_from_sigma_bar(sb), torch.zeros(1, dtype=torch.float64)])


def estimate(model, cond, opts, K, G_, schedule, steps):
    """Per-condition weighted mean and std of coordinate 0, and the smallest ESS/K over the run."""
    res = steer.smc(model, cond=torch.full((G_,), cond, dtype=torch.long), method="fkc", particles=K,
                    timesteps=karras(model.path, steps), seed=list(range(G_)), output="weighted", dtype=torch.float64,
                    schedule=schedule, **opts)
    w, x = res.log_weights.exp(), res.particles[..., 0]
    if schedule == []:
        w = torch.full_like(w, 1 / K)
    m = (w * x).sum(1)
    s = (w * (x - m[:, None]) ** 2).sum(1).sqrt()
    return m, s, (res.ess.min(0).values / K).median().item()


def fmt(v: torch.Tensor) -> str:
    return f"{v.mean():.4f} ± {v.std() / math.sqrt(len(v)):.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--particles", type=int, nargs="+", default=[8, 32, 256, 1024])
    ap.add_argument("--importance", type=int, default=100_000, help="particles of the plain importance-sampling "
                    "runs (w = 3 mixture, never resampled, 3 seeds); 0 skips them")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    pair = G.conditional_pair(G.GaussianMixture([[1.0]], stds=[0.5]), G.GaussianMixture([[0.0]], stds=[1.0]))
    n = args.groups
    cases = [
        ("CFG w = 3 (Gaussian pair)", pair, 1, {"guidance": "cfg(scale=3)"}, 1.2, math.sqrt(0.1)),
        ("tempering p(x|c)^2", pair, 1, {"experts": {"cond": 1.0}, "beta": 2.0}, 1.0, math.sqrt(0.125)),
        ("product p(x|c)·p(x)", pair, 1, {"experts": {"cond": 1.0, "negative": 1.0},
                                          "negative": torch.zeros(n, dtype=torch.long)}, 0.8, math.sqrt(0.2)),
    ]
    toy = G.toy()
    for w in (1.5, 2.0, 3.0):
        ref = G.cfg_tilted_sample(toy, 0, w, 400_000, generator=torch.Generator().manual_seed(1))
        cases.append((f"CFG w = {w:g} (2-D mixture, class 0)", toy.denoiser("flow", "x0"), 0,
                      {"guidance": f"cfg(scale={w:g})"}, ref[:, 0].mean().item(), ref[:, 0].std().item()))
    rows = []
    for name, model, cond, opts, mu, sd in cases:
        t0 = time.perf_counter()
        m, s, _ = estimate(model, cond, opts, 256, n, [], args.steps)
        rows.append(f"| {name} | unweighted SDE | 256 | {fmt(m)} | {mu:.4f} | {fmt(s)} | {sd:.4f} | – |")
        for K in args.particles:
            m, s, e = estimate(model, cond, opts, K, n, 0.5, args.steps)
            rows.append(f"| {name} | FKC | {K} | {fmt(m)} | {mu:.4f} | {fmt(s)} | {sd:.4f} | {e:.3f} |")
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    tail = []
    if args.importance:  # the w = 3 mixture's weights without resampling: their effective sample size
        model, mu = cases[-1][1], cases[-1][4]
        tail = ["", f"Plain importance sampling (FKC's weights, never resampled), w = 3 mixture, one condition of "
                f"{args.importance:,} particles per seed, {args.steps} steps; exact mean {mu:.4f}:", "",
                "| seed | weighted mean | weighted std | ESS |", "|---|---|---|---|"]
        for seed in range(3):
            res = steer.smc(model, cond=torch.zeros(1, dtype=torch.long), guidance="cfg(scale=3)", method="fkc",
                            particles=args.importance, timesteps=karras(model.path, args.steps), seed=[seed],
                            output="weighted", dtype=torch.float64, schedule=[])
            w, x = res.log_weights.exp()[0], res.particles[0, :, 0]
            m = (w * x).sum()
            tail.append(f"| {seed} | {m:.4f} | {((w * (x - m) ** 2).sum()).sqrt():.4f} | {1 / (w * w).sum():.0f} |")
    text = "\n".join([
        f"FK correctors against exact targets: {n} conditions per row, {args.steps} Karras steps of dpmpp_2m_sde, "
        "resampling at ESS < K/2; statistic of coordinate 0 per condition (weighted), mean ± standard error over the "
        "conditions. "
        "`python benchmarks/fkc_exact.py`.", "",
        "| target | sampler | K | mean | exact mean | std | exact std | min ESS/K (median) |",
        "|---|---|---|---|---|---|---|---|", *rows, *tail, ""])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fkc_exact.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
