"""Empirical convergence order of every ODE solver on the exact Gaussian-mixture testbed.

Global RMS error against the reference probability-flow ODE solution (scipy DOP853, rtol 1e-11) at N, 2N, 4N,
8N steps; the order is log2 of the error ratio per halving. Paths: rectified flow from pure noise (t = 1 → 0.02,
uniform t) and vp-linear (t = 1 → 0.01, uniform log-SNR). Writes a markdown table to stdout and
bench-out/convergence.md (--out).

    python benchmarks/convergence.py [--n0 16] [--samples 64]
"""
import argparse
import math
from pathlib import Path

import torch

import steer
from steer.paths import uniform_lambda
from steer.testbeds import gmm

SOLVERS = ["euler", "heun", "midpoint", "dpmpp_2m", "dpmpp_3m(variant='taylor')", "dpmpp_3m(variant='published')",
           "unipc", "unipc(corrector=False)", "deis", "deis(order=3)", "dpmpp_2m(momentum=0.8)"]
CASES = {"flow": (1.0, 0.02, "flow"), "vp-linear": (1.0, 0.01, "eps")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n0", type=int, default=16, help="coarsest number of steps")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "convergence.md",
                    help="where to write (default bench-out/, outside the committed tree; "
                         "benchmarks/out/ holds the committed reference)")
    args = ap.parse_args()
    ns = [args.n0 * 2**k for k in range(4)]
    g = gmm.toy(dim=2)
    z = torch.randn(args.samples, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(args.samples) % g.n_classes
    lines = [f"| solver | path | RMS error at {', '.join(map(str, ns))} steps | order per halving |",
             "|---|---|---|---|"]
    for name in SOLVERS:
        for path_name, (t0, t1, pred) in CASES.items():
            den = g.denoiser(path_name, pred)
            path = den.path
            ref = g.ode_solution(z * float(torch.hypot(path.alpha(t0), path.sigma(t0))), t0, t1, path, labels)
            errs = []
            for n in ns:
                grid = (torch.linspace(t0, t1, n + 1, dtype=torch.float64) if path_name == "flow"
                        else uniform_lambda(path, n, t_max=t0, t_min=t1, append_zero=False))
                x = steer.sample(den, noise=z, cond=labels, solver=name, timesteps=grid)
                errs.append(float((x - ref).pow(2).mean().sqrt()))
            orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
            lines.append(f"| `{name}` | {path_name} | {' / '.join(f'{e:.2e}' for e in errs)} | "
                         f"{' / '.join(f'{o:.2f}' for o in orders)} |")
            print(lines[-1], flush=True)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
