"""The ``steer`` command line (typer + rich)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path as FilePath
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="steer: inference-time steering of diffusion and flow-matching models.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)

MODELS = ("gmm",)
COMPARE_SOLVERS = ("euler", "heun", "midpoint", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m(variant='published')",
                   "unipc", "deis")


def _fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit: code 2 for bad usage, 1 for a failure while running."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _os_error(e: OSError) -> str:
    if isinstance(e, FileExistsError) and e.filename and not FilePath(e.filename).is_dir():
        return f"{e.filename} is not a directory"  # mkdir(exist_ok=True) on a file
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else str(e)


@app.command()
def solvers(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the solvers with their order, cost and defaults."""
    from .solvers import solver_table

    rows = solver_table()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="steer solvers")
    for col in ("name", "order", "kind", "NFE/step", "defaults", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        defaults = ", ".join(f"{k}={v!r}" for k, v in r["defaults"].items()) or "-"
        arxiv = re.search(r"arXiv (\d{4}\.\d{4,5})", r["paper"])
        short = r["paper"].split(",")[0] + (f" · arXiv {arxiv.group(1)}" if arxiv else "")
        table.add_row(r["name"], str(r["order"]), "SDE" if r["stochastic"] else "ODE", str(r["nfe_per_step"]),
                      defaults, short)
    console.print(table)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """List the guidance methods: paper, space, extra NFEs, need for hooks, defaults and their source."""
    from .guidance import REGISTRY

    rows = [{"name": m.name, "family": m.family, "paper": m.paper, "arxiv": m.arxiv, "space": m.space,
             "extra_nfe": m.extra_nfe, "needs_hooks": m.needs_hooks,
             "defaults": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                          for k, v in m.defaults.items() if k != "kwargs"},
             "defaults_source": m.defaults_source} for m in REGISTRY.values()]
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="steer guidance methods (spec: name(key=value, ...); stack with +)")
    for col in ("name", "paper · arXiv", "space", "extra NFE", "hooks", "defaults (source)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        defaults = ", ".join(f"{k}={v}" for k, v in r["defaults"].items() if v is not None and k != "modifier")
        table.add_row(r["name"], f"{r['paper'].split(',')[0]} · {r['arxiv']}", r["space"], r["extra_nfe"],
                      "yes" if r["needs_hooks"] else "-",
                      f"{defaults} ({r['defaults_source']})")
    console.print(table)


@app.command()
def sample(
    model: str = typer.Option("gmm", help=f"Model: one of {', '.join(MODELS)}."),
    path: str = typer.Option("flow", help="Probability path of the testbed model (flow, vp-linear, "
                             "vp-scaled-linear, vp-cosine, edm)."),
    solver: str = typer.Option("dpmpp_2m", help="Solver spec, e.g. 'ddim(eta=0.5)'. See `steer solvers`."),
    steps: int = typer.Option(25, min=1, help="Number of solver steps."),
    guidance: Optional[str] = typer.Option(None, help="Guidance spec, e.g. 'cfg(scale=3)'."),
    n: int = typer.Option(1000, min=2, help="Number of samples (labels cycle over the classes)."),
    dim: int = typer.Option(2, min=1, help="Dimension of the Gaussian mixture."),
    seed: int = typer.Option(0, help="Random seed."),
    compare_solvers: bool = typer.Option(False, "--compare-solvers", help="Print a solver-accuracy table against "
                                         "the exact ODE solution instead."),
    out: Optional[FilePath] = typer.Option(None, help="Save the samples to this .npy file."),
):
    """Sample from a testbed model and report how close the samples are to the exact distribution."""
    import torch

    import steer
    from .guidance import parse as parse_guidance
    from .metrics import energy_distance
    from .testbeds import gmm

    if model not in MODELS:
        _fail(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    try:
        p = steer.get_path(path)
        solver_ = steer.get_solver(solver)
        guide = parse_guidance(guidance)
    except ValueError as e:
        _fail(str(e))
    g = gmm.toy(dim=dim)
    den = g.denoiser(p, "flow" if p.kind == "flow" else "eps")
    labels = torch.arange(n) % g.n_classes

    if compare_solvers:
        _compare(g, den, labels, seed)
        return
    t0 = time.perf_counter()
    try:
        res = steer.sample(den, cond=labels, guidance=guide, solver=solver_, steps=steps, seed=seed,
                           progress=True, return_info=True)
    except steer.NonFiniteError as e:
        _fail(f"sampling failed: {e}", code=1)
    except ValueError as e:  # options that cannot run together, e.g. cfgpp with a solver that cannot re-noise
        _fail(str(e))
    wall = time.perf_counter() - t0
    exact = g.sample(n, labels, generator=torch.Generator().manual_seed(seed + 1))
    logp = g.classifier_log_probs(res.x, 0.0, p).gather(1, labels[:, None]).mean()
    table = Table(title=f"{n} samples from the exact {dim}-D mixture ({p.name} path)")
    for col in ("solver", "guidance", "steps", "NFE/sample", "energy distance to p(x0|c)", "mean log p(c|x0)",
                "time (s)"):
        table.add_column(col)
    table.add_row(solver, guidance or "-", str(steps), str(res.nfe), f"{energy_distance(res.x, exact):.5f}",
                  f"{float(logp):.4f}", f"{wall:.2f}")
    console.print(table)
    if out is not None:
        try:
            _save_atomic(out, res.x.numpy())
        except OSError as e:
            _fail(f"cannot write the samples to {out}: {_os_error(e)}", code=1)
        console.print(f"saved {tuple(res.x.shape)} samples to {out}")


def _compare(g, den, labels, seed):
    import torch
    from rich.progress import Progress

    import steer

    z = torch.randn(len(labels), g.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    step_counts = (5, 10, 20)
    with console.status("solving the reference probability-flow ODE (scipy DOP853, rtol 1e-11)"):
        grid0 = den.path.default_grid(1)
        x_start = z * float(torch.hypot(den.path.alpha(grid0[0]), den.path.sigma(grid0[0])))
        ref = g.ode_solution(x_start, float(grid0[0]), 0.0, den.path, labels)
    table = Table(title=f"RMS error against the exact ODE solution ({den.path.name} path, default grid, "
                        f"{len(labels)} samples)")
    table.add_column("solver")
    for s in step_counts:
        table.add_column(f"{s} steps: error")
        table.add_column("NFE")
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("solvers", total=len(COMPARE_SOLVERS) * len(step_counts))
        for name in COMPARE_SOLVERS:
            row = [name]
            for s in step_counts:
                res = steer.sample(den, noise=z, cond=labels, solver=name, steps=s, return_info=True)
                row += [f"{float((res.x - ref).pow(2).mean().sqrt()):.2e}", str(res.nfe)]
                prog.advance(task)
            table.add_row(*row)
    console.print(table)


def _save_atomic(path: FilePath, array) -> None:
    import numpy as np

    path = FilePath(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


testbed_app = typer.Typer(help="Testbed models: train the digits checkpoints.", no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
TESTBEDS = ("digits",)


@testbed_app.command("train")
def testbed_train(
    testbed: str = typer.Argument(..., help=f"Testbed to train: one of {', '.join(TESTBEDS)}."),
    seed: int = typer.Option(0, help="Random seed (the same seed reproduces the weights on one machine)."),
    out: Optional[FilePath] = typer.Option(None, help="Directory for the weights and manifest.json "
                                           "(default: the package's steer/testbeds/weights)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated subset of eps, flow, flow-weak, classifier "
                                       "(the manifest keeps the other entries)."),
    smoke: bool = typer.Option(False, "--smoke", hidden=True, help="Tiny networks, a few steps (for tests)."),
):
    """Train the testbed's checkpoints (digits: eps, flow, flow-weak, classifier), writing each file atomically."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .testbeds import digits

    if testbed not in TESTBEDS:
        _fail(f"unknown testbed {testbed!r}; allowed: {', '.join(TESTBEDS)}")
    names = digits.NAMES if only is None else tuple(s.strip() for s in only.split(",") if s.strip())
    bad = [n for n in names if n not in digits.NAMES]
    if bad or not names:
        _fail(f"unknown checkpoint(s) {', '.join(map(repr, bad)) or '(none given)'}; "
              f"allowed: {', '.join(digits.NAMES)}")
    recipes = digits.tiny_recipes() if smoke else digits.RECIPES
    weights_dir = out if out is not None else digits.WEIGHTS_DIR
    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console) as prog:
        tasks = {n: prog.add_task(n, total=recipes[n].iters, loss=float("nan")) for n in digits.TRAIN_ORDER
                 if n in names}

        def cb(name, k, total, loss):
            if k % 10 == 0 or k == total:
                prog.update(tasks[name], completed=k, loss=loss)

        try:
            entries = digits.train_all(weights_dir, seed=seed, names=names, recipes=recipes, callback=cb)
        except OSError as e:
            _fail(f"cannot write the weights to {weights_dir}: {_os_error(e)}", code=1)
    table = Table(title=f"digits checkpoints in {weights_dir} ({time.perf_counter() - t0:.0f} s)")
    for col in ("name", "model", "params", "steps", "seconds", "MB", "result"):
        table.add_column(col)
    for name, e in entries.items():
        model = "classifier" if "metrics" in e else f"{e['prediction']} on {e['path']}"
        result = (f"held-out accuracy {e['metrics']['held_out_accuracy']:.2%}" if "metrics" in e
                  else f"loss {e['final_loss_avg']:.4f}")
        table.add_row(name, model, f"{e['params']:,}", str(e["recipe"]["iters"]), f"{e['train_seconds']:.0f}",
                      f"{e['bytes'] / 1e6:.2f}", result)
    console.print(table)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
