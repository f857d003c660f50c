"""Which solver is most accurate at 5, 10 and 20 NFE on each path, measured on the exact testbed.

Every solver samples the exact class-conditional Gaussian mixture (``gmm.toy(dim=2)``, 3 classes, no guidance,
float64) on the path's default grid with the most steps whose NFE per sample fits the budget (Heun's last step to
σ = 0 costs 1; the Taylor 3M warm-up +1; Restart's restarts count). Two tables:

(a) ODE solvers: the RMS difference from the reference probability-flow ODE solution from the same starting
    state (``GaussianMixture.ode_solution``, DOP853, rtol 1e-11), over all samples and coordinates;
(b) every solver (SDE ones included): the energy distance between the samples and exact samples of ``p(x0 | c)``
    with the same labels, beside the floor of two exact sample sets of that size.

Table (a) is also written as ``src/steer/solver_accuracy.py`` (``--package``), which ``steer solvers`` reads to
tell which ODE solver is most accurate per path and budget; tests/test_fidelity.py recomputes one cell with
``ode_error`` and checks it equals the packaged number.

    python benchmarks/solver_table.py [--samples 256] [--out bench-out/solver_table.md] [--package]
"""
import argparse
import pprint
import time
from pathlib import Path

import torch

import steer
from steer.metrics import energy_distance
from steer.testbeds import gmm

PATHS = [("flow", "flow"), ("vp-linear", "eps"), ("vp-scaled-linear", "eps"), ("vp-cosine", "eps"), ("edm", "x0")]
ODE_SOLVERS = ["euler", "heun", "midpoint", "dpmpp_2m", "dpmpp_3m(variant='published')",
               "dpmpp_3m(variant='taylor')", "unipc", "deis"]
SDE_SOLVERS = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "restart"]
BUDGETS = [5, 10, 20]
PACKAGED = Path(__file__).resolve().parents[1] / "src" / "steer" / "solver_accuracy.py"

_REF: dict = {}


def setup(path: str, pred: str, samples: int, seed: int = 0):
    mix = gmm.toy(dim=2)
    den = mix.denoiser(path, pred)
    z = torch.randn(samples, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(samples) % mix.n_classes
    return mix, den, z, labels


def steps_within(den, solver: str, nfe: int) -> int | None:
    """The most steps whose NFE per sample is at most ``nfe`` (counted on a one-sample run), or None."""
    z = torch.zeros(1, 2, dtype=torch.float64)
    for steps in range(nfe, 0, -1):
        if steer.sample(den, noise=z, cond=torch.zeros(1, dtype=torch.long), solver=solver, steps=steps,
                        seed=0, return_info=True).nfe <= nfe:
            return steps
    return None


def reference(path: str, pred: str, samples: int, seed: int = 0) -> torch.Tensor:
    key = (path, samples, seed)
    if key not in _REF:
        mix, den, z, labels = setup(path, pred, samples, seed)
        grid = den.path.default_grid(4)  # every default grid starts at the same t and ends at t = 0
        p = den.path
        start = z * float(torch.hypot(p.alpha(grid[0]), p.sigma(grid[0])))
        _REF[key] = mix.ode_solution(start, float(grid[0]), float(grid[-1]), p, labels)
    return _REF[key]


def ode_error(solver: str, path: str, nfe: int, samples: int = 256, seed: int = 0) -> dict | None:
    """RMS error against the reference PF-ODE solution at the most steps that fit ``nfe`` (None if none fit)."""
    pred = dict(PATHS)[path]
    mix, den, z, labels = setup(path, pred, samples, seed)
    steps = steps_within(den, solver, nfe)
    if steps is None:
        return None
    res = steer.sample(den, noise=z, cond=labels, solver=solver, steps=steps, return_info=True)
    err = float((res.x - reference(path, pred, samples, seed)).pow(2).mean().sqrt())
    return {"steps": steps, "nfe": res.nfe, "error": err}


def distribution_error(solver: str, path: str, nfe: int, samples: int, seed: int = 0) -> dict | None:
    pred = dict(PATHS)[path]
    mix, den, z, labels = setup(path, pred, samples, seed)
    steps = steps_within(den, solver, nfe)
    if steps is None:
        return None
    res = steer.sample(den, noise=z, cond=labels, solver=solver, steps=steps, seed=seed + 1, return_info=True)
    exact = mix.sample(samples, labels, generator=torch.Generator().manual_seed(seed + 2))
    return {"steps": steps, "nfe": res.nfe, "energy": energy_distance(res.x, exact)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--dist-samples", type=int, default=2000)
    ap.add_argument("--out", default="bench-out/solver_table.md")
    ap.add_argument("--package", action="store_true", help=f"also write {PACKAGED.relative_to(PACKAGED.parents[2])}")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    lines = ["## Solver accuracy at matched NFE on the exact testbed", "",
             f"gmm.toy(dim=2), 3 classes, no guidance, float64, each path's default grid; steer "
             f"{steer.__version__}, torch {torch.__version__}. Produced by `benchmarks/solver_table.py`.", "",
             f"### (a) ODE solvers: RMS error against the reference PF-ODE solution ({args.samples} samples)", "",
             "Each cell: error (steps, NFE). **Bold**: the most accurate at that budget on that path.", ""]
    table: dict = {}
    for path, _ in PATHS:
        table[path] = {}
        lines += [f"#### {path}", "", "| solver | " + " | ".join(f"{b} NFE" for b in BUDGETS) + " |",
                  "|---|" + "---|" * len(BUDGETS)]
        cells = {s: {b: ode_error(s, path, b, args.samples) for b in BUDGETS} for s in ODE_SOLVERS}
        for b in BUDGETS:
            table[path][b] = {s: cells[s][b] for s in ODE_SOLVERS if cells[s][b] is not None}
        best = {b: min(table[path][b], key=lambda s: table[path][b][s]["error"]) for b in BUDGETS}
        for s in ODE_SOLVERS:
            row = []
            for b in BUDGETS:
                c = cells[s][b]
                text = "—" if c is None else f"{c['error']:.3e} ({c['steps']}, {c['nfe']})"
                row.append(f"**{text}**" if c is not None and best[b] == s else text)
            lines.append(f"| `{s}` | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
        lines.append("")
    n = args.dist_samples
    mix = gmm.toy(dim=2)
    labels = torch.arange(n) % mix.n_classes
    floor = energy_distance(mix.sample(n, labels, generator=torch.Generator().manual_seed(10)),
                            mix.sample(n, labels, generator=torch.Generator().manual_seed(11)))
    lines += [f"### (b) Every solver: energy distance to exact samples of p(x0 | c) ({n} samples)", "",
              f"Floor (two exact sample sets of {n}): {floor:.2e} (the estimate is unbiased, so it scatters around 0 "
              "by about that much). Each cell: energy distance (steps, NFE).", "",
              "| solver | path | " + " | ".join(f"{b} NFE" for b in BUDGETS) + " |",
              "|---|---|" + "---|" * len(BUDGETS)]
    for path, _ in PATHS:
        for s in ODE_SOLVERS + SDE_SOLVERS:
            cells = [distribution_error(s, path, b, n) for b in BUDGETS]
            row = ["—" if c is None else f"{c['energy']:.2e} ({c['steps']}, {c['nfe']})" for c in cells]
            lines.append(f"| `{s}` | {path} | " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.time() - t0:.0f} s."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if args.package:
        compact = {p: {b: {s: {"steps": c["steps"], "nfe": c["nfe"], "error": float(f"{c['error']:.6e}")}
                           for s, c in cells.items()} for b, cells in by_b.items()} for p, by_b in table.items()}
        PACKAGED.write_text(
            '"""Solver accuracy on the exact testbed, generated by benchmarks/solver_table.py --package '
            '(do not edit).\n\n'
            "``ACCURACY[path][nfe][solver]``: the RMS error against the reference PF-ODE solution of\n"
            f"gmm.toy(dim=2) ({args.samples} samples, seed 0, float64, the path's default grid) at the most steps\n"
            '(and the NFE they cost) within ``nfe`` network evaluations per sample."""\n\n'
            f"SAMPLES = {args.samples}\n\nACCURACY = {pprint.pformat(compact, width=116, sort_dicts=False)}\n")
    print(f"wrote {out}" + (f" and {PACKAGED}" if args.package else ""))


if __name__ == "__main__":
    main()
