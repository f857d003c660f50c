"""The ``steer`` command line (typer + rich)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
import time
from pathlib import Path as FilePath
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._typer import Command as _Command, Group as _Group
from .bench.cli import app as bench_app

app = typer.Typer(help="steer: inference-time steering of diffusion and flow-matching models.", cls=_Group,
                  no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)

MODELS = ("gmm", "digits", "digits-eps")
DIGITS_CHECKPOINTS = {"digits": "flow", "digits-eps": "eps"}
DEFAULT_SOLVER = "dpmpp_2m"
COMPARE_SOLVERS = ("euler", "heun", "midpoint", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m(variant='taylor')",
                   "unipc", "deis")
COMPARE_STEPS = (5, 10, 20)
JSON_HELP = "Print every field as JSON (for scripts) instead of the summary."


def _fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit: code 2 for bad usage, 1 for a failure while running."""
    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _os_error(e: OSError) -> str:
    if isinstance(e, FileExistsError) and e.filename and not FilePath(e.filename).is_dir():
        return f"{e.filename} is not a directory"  # mkdir(exist_ok=True) on a file
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else str(e)


def _print_wrapped(text: str, indent: int = 0) -> None:
    """Print ``text`` wrapped at the terminal width, breaking only at ASCII spaces (never inside a word or at a
    hyphen; non-breaking spaces hold a ``key=value`` or ``arXiv id`` together)."""
    text = re.sub(r"arXiv (\d)", "arXiv\xa0\\1", text)
    lines = textwrap.wrap(text, width=console.width, subsequent_indent=" " * indent, break_long_words=False,
                          break_on_hyphens=False)
    print("\n".join(line.replace("\xa0", " ") for line in lines))


def _key_values(d: dict) -> str:
    return ", ".join(f"{k}={v}".replace(" ", "\xa0") for k, v in d.items()) or "-"


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"steer {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """steer: inference-time steering of diffusion and flow-matching models."""


@app.command(cls=_Command)
def solvers(long: bool = typer.Option(False, "--long", help="Show every solver's options and paper."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """List the solvers: one line each (name, order, ODE/SDE, NFE per step, arXiv id); * marks the default."""
    from .solvers import solver_table

    rows = solver_table()
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if long:
        for r in rows:
            mark = " (the default)" if r["name"] == DEFAULT_SOLVER else ""
            _print_wrapped(f"{r['name']}{mark} · order {r['order']} · {'SDE' if r['stochastic'] else 'ODE'} · "
                           f"{r['nfe_per_step']} NFE/step", indent=4)
            _print_wrapped(f"  options: {_key_values({k: repr(v) for k, v in r['defaults'].items()})}", indent=4)
            _print_wrapped(f"  paper: {r['paper']}", indent=4)
        return
    print("steer solvers (* = the default; --long for options and papers)")
    print(f"  {'name':<16} {'order':<6} {'kind':<5} {'NFE/step':<9} arXiv")
    for r in rows:
        arxiv = re.search(r"arXiv (\d{4}\.\d{4,5})", r["paper"])
        print(f"{'*' if r['name'] == DEFAULT_SOLVER else ' '} {r['name']:<16} {r['order']:<6} "
              f"{'SDE' if r['stochastic'] else 'ODE':<5} {r['nfe_per_step']:<9} {arxiv.group(1) if arxiv else '-'}")
    print("NFE/step: model evaluations per step (times the guidance's branches).")
    _print_most_accurate()


def _print_most_accurate() -> None:
    from .solver_accuracy import ACCURACY, SAMPLES
    from .solvers import most_accurate

    budgets = sorted({b for cells in ACCURACY.values() for b in cells})
    _print_wrapped(f"Most accurate ODE solver per path at {' / '.join(map(str, budgets))} NFE per sample, measured "
                   f"(RMS error against the exact PF-ODE solution; Gaussian-mixture testbed, {SAMPLES} samples, the "
                   "path's default grid; benchmarks/out/solver_table.md):")
    for path in ACCURACY:
        cells = []
        for b in budgets:
            best = most_accurate(path, b)
            name = "-" if best is None else best[0].replace("(variant='published')", "").replace("variant=", "")
            cells.append(f"{b}:\xa0{name}" + ("" if best is None else f"\xa0{best[1]['error']:.1e}"))
        _print_wrapped(f"  {path}: " + ", ".join(cells), indent=4)


def _method_rows() -> list[dict]:
    from .guidance import REGISTRY

    return [{"name": m.name, "family": m.family, "paper": m.paper, "arxiv": m.arxiv, "space": m.space,
             "extra_nfe": m.extra_nfe, "needs_hooks": m.needs_hooks,
             "defaults": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                          for k, v in m.defaults.items() if k != "kwargs"},
             "defaults_source": m.defaults_source} for m in REGISTRY.values()]


@app.command(cls=_Command)
def methods(name: Optional[str] = typer.Argument(None, metavar="NAME",
                                                 help="Show this method's details (as --long does)."),
            long: bool = typer.Option(False, "--long", help="Show every method's details and sources."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """List the guidance methods: one line each (name, family, extra NFE per step, arXiv id, main default)."""
    rows = _method_rows()
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
        if not rows:
            _fail(f"unknown guidance method {name!r}; see `steer methods`")
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    if long or name is not None:
        for r in rows:
            defaults = {k: v for k, v in r["defaults"].items() if v is not None and k != "modifier"}
            arxiv = f" · arXiv {r['arxiv']}" if r["arxiv"] != "-" else ""
            _print_wrapped(f"{r['name']} ({r['family']}) · {r['paper']}{arxiv}", indent=4)
            _print_wrapped(f"  space: {r['space']} · extra NFE per step: {r['extra_nfe']} · attention hooks: "
                           f"{'needed' if r['needs_hooks'] else 'no'}", indent=4)
            _print_wrapped(f"  defaults: {_key_values(defaults)}", indent=4)
            _print_wrapped(f"  source of the defaults: {r['defaults_source']}", indent=4)
        return
    print("steer methods (spec: name(key=value, ...), stack with +; --long or")
    print("`steer methods NAME` for details and sources)")
    print(f"  {'name':<17} {'family':<13} {'extra NFE':<10} {'arXiv':<11} default")
    for r in rows:
        nfe = r["extra_nfe"].split(" ")[0].rstrip(",")
        nfe += "…" if nfe != r["extra_nfe"] else ""
        main = next(((k, v) for k, v in r["defaults"].items() if v is not None), None)
        print(f"  {r['name']:<17} {r['family']:<13} {nfe:<10} {r['arxiv']:<11} "
              f"{f'{main[0]}={main[1]}' if main else '-'}")
    _print_wrapped("extra NFE: model evaluations per step on top of the conditional one (…: it varies, see --long).")


def _given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` that the user set (on the command line or through the environment)."""
    return [f"--{n.replace('_', '-')}" for n in names
            if ctx.get_parameter_source(n).name not in ("DEFAULT", "DEFAULT_MAP")]


@app.command(cls=_Command)
def sample(
    ctx: typer.Context,
    model: str = typer.Option("gmm", help="Model: gmm (a Gaussian mixture with exact scores), digits (the shipped "
                              "flow model on 8x8 digits) or digits-eps (the shipped eps model)."),
    path: str = typer.Option("flow", help="gmm only: probability path (flow, vp-linear, vp-scaled-linear, "
                             "vp-cosine, edm)."),
    solver: str = typer.Option(DEFAULT_SOLVER, help="Solver spec, e.g. 'ddim(eta=0.5)'. See `steer solvers`."),
    steps: int = typer.Option(25, min=1, help="Number of solver steps."),
    guidance: Optional[str] = typer.Option(None, help="Guidance spec, e.g. 'cfg(scale=3)'. See `steer methods`."),
    n: Optional[int] = typer.Option(None, min=2, help="Number of samples, labels cycling over the classes "
                                    "(default: 1000 for gmm, 100 for digits)."),
    dim: int = typer.Option(2, min=1, help="gmm only: dimension of the Gaussian mixture."),
    seed: int = typer.Option(0, help="Random seed."),
    compare_solvers: bool = typer.Option(False, "--compare-solvers", help="gmm only: instead, print every "
                                         "solver's error against the exact ODE solution at "
                                         f"{', '.join(map(str, COMPARE_STEPS))} steps, without guidance."),
    out: Optional[FilePath] = typer.Option(None, help="Save the samples: NAME.png writes a labelled image grid "
                                           "(digits models), any other name a .npy array; with --diffusers the "
                                           "image (.png, .jpg)."),
    diffusers: Optional[FilePath] = typer.Option(None, metavar="PATH", help="Instead, generate an image with the "
                                                 "diffusers pipeline in this local folder (SD1.5, SD2, SDXL, SD3, "
                                                 "Flux; nothing is downloaded)."),
    prompt: Optional[str] = typer.Option(None, help="--diffusers only: the prompt."),
    negative_prompt: Optional[str] = typer.Option(None, help="--diffusers only: the negative prompt (the "
                                                  "unconditional branch of CFG-family guidance)."),
    height: Optional[int] = typer.Option(None, min=8, help="--diffusers only: image height (default: the "
                                         "pipeline's)."),
    width: Optional[int] = typer.Option(None, min=8, help="--diffusers only: image width (default: the pipeline's)."),
    device: Optional[str] = typer.Option(None, help="--diffusers only: torch device, e.g. cuda (default: cpu)."),
    dtype: Optional[str] = typer.Option(None, help="--diffusers only: float32, float16 or bfloat16 (default: as "
                                        "saved)."),
    lora: Optional[list[FilePath]] = typer.Option(None, metavar="PATH", help="--diffusers only: a LoRA to load "
                                                  "with the pipeline's load_lora_weights (a local folder or "
                                                  ".safetensors file; repeat for several)."),
    lora_scale: Optional[float] = typer.Option(None, help="--diffusers only: the LoRA scale (default 1)."),
):
    """Sample from a testbed model and report how close the samples are to the target distribution; or, with
    --diffusers PATH, generate an image with a local diffusers pipeline and any steer guidance and solver."""
    diffusers_only = ("prompt", "negative_prompt", "height", "width", "device", "dtype", "lora", "lora_scale")
    if diffusers is not None:
        ignored = _given(ctx, "model", "path", "dim", "n", "compare_solvers")
        if ignored:
            _fail(f"--diffusers generates one image with the pipeline in PATH; it does not take {', '.join(ignored)}")
        _sample_diffusers(ctx, diffusers, prompt, negative_prompt, solver, steps, guidance, seed, height, width,
                          device, dtype, out, lora or [], lora_scale)
        return
    ignored = _given(ctx, *diffusers_only)
    if ignored:
        _fail(f"{', '.join(ignored)} set a diffusers pipeline: pass --diffusers PATH")
    if model not in MODELS:
        _fail(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    if compare_solvers:
        ignored = _given(ctx, "solver", "steps", "guidance", "out")
        if ignored:
            _fail(f"--compare-solvers compares every solver at its own step counts without guidance; it does not "
                  f"take {', '.join(ignored)}")
        if model != "gmm":
            _fail("--compare-solvers needs the exact ODE solution, which only the gmm model has")
    if model == "gmm":
        if out is not None and out.suffix.lower() == ".png":
            _fail("--out NAME.png writes an image grid, for the digits models; save gmm samples as .npy")
        _sample_gmm(path, solver, steps, guidance, n or 1000, dim, seed, compare_solvers, out)
    else:
        ignored = _given(ctx, "path", "dim")
        if ignored:
            _fail(f"{', '.join(ignored)} set the gmm model; the digits models have their own path and shape")
        _sample_digits(model, solver, steps, guidance, n or 100, seed, out)


def _parse(solver: str, guidance: Optional[str], path: Optional[str] = None):
    import steer
    from .guidance import parse as parse_guidance

    try:
        return (steer.get_solver(solver), parse_guidance(guidance),
                steer.get_path(path) if path is not None else None)
    except ValueError as e:
        _fail(str(e))


def _run(den, labels, guide, solver_, steps, seed):
    """``steer.sample`` with a progress bar; returns the result and the wall time in seconds."""
    import steer

    t0 = time.perf_counter()
    try:
        res = steer.sample(den, cond=labels, guidance=guide, solver=solver_, steps=steps, seed=seed,
                           progress=True, return_info=True)
    except steer.NonFiniteError as e:
        _fail(f"sampling failed: {e}", code=1)
    except ValueError as e:  # options that cannot run together, e.g. cfgpp with a solver that cannot re-noise
        _fail(str(e))
    return res, time.perf_counter() - t0


def _print_metrics(title: str, columns: dict, notes: list[str]) -> None:
    """A one-row table of ``columns`` (header -> value) and one line explaining each metric in ``notes``."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    table.add_row(*columns.values())
    console.print(table)
    for note in notes:
        _print_wrapped(note, indent=2)


def _sample_gmm(path, solver, steps, guidance, n, dim, seed, compare_solvers, out):
    import torch

    from .metrics import energy_distance
    from .testbeds import gmm

    solver_, guide, p = _parse(solver, guidance, path)
    g = gmm.toy(dim=dim)
    den = g.denoiser(p, "flow" if p.kind == "flow" else "eps")
    labels = torch.arange(n) % g.n_classes
    if compare_solvers:
        _compare(g, den, labels, seed)
        return
    res, wall = _run(den, labels, guide, solver_, steps, seed)
    exact = g.sample(n, labels, generator=torch.Generator().manual_seed(seed + 1))
    logp = g.classifier_log_probs(res.x, 0.0, p).gather(1, labels[:, None]).mean()
    _print_metrics(f"{n} samples from the exact {dim}-D mixture ({p.name} path)", {
        "solver": solver, "guidance": guidance or "-", "steps": str(steps), "NFE/sample": str(res.nfe),
        "energy distance": f"{energy_distance(res.x, exact):.5f}", "mean log p(c|x)": f"{float(logp):.4f}",
        "time (s)": f"{wall:.2f}"}, [
        "NFE/sample: model evaluations per sample (all guidance branches counted).",
        f"energy distance: to {n} exact samples of p(x0|c), unbiased estimate: about 0 when the two match (it "
        "can be slightly negative), larger when they differ.",
        "mean log p(c|x): the exact mixture's log-probability of each sample's own class (0 at best; guidance "
        "raises it).",
    ])
    if out is not None:
        _save(out, res.x.numpy())


def _sample_digits(model, solver, steps, guidance, n, seed, out):
    import torch

    from .metrics import accuracy, saturation
    from .testbeds import digits

    solver_, guide, _ = _parse(solver, guidance)
    try:
        den, classifier = digits.load(DIGITS_CHECKPOINTS[model]), digits.load("classifier")
    except digits.WeightsError as e:
        _fail(str(e), code=1)
    labels = torch.arange(n) % 10
    res, wall = _run(den, labels, guide, solver_, steps, seed)
    with torch.no_grad():
        acc = accuracy(classifier(res.x.float()), labels)
    sat = saturation(res.x)
    _print_metrics(f"{n} digits from the shipped {DIGITS_CHECKPOINTS[model]} model ({den.path.name} path)", {
        "solver": solver, "guidance": guidance or "-", "steps": str(steps), "NFE/sample": str(res.nfe),
        "class accuracy": f"{acc:.1%}", "out of [-1, 1]": f"{sat['frac_out']:.1%}",
        "mean excess": f"{sat['excess']:.4f}", "time (s)": f"{wall:.2f}"}, [
        "NFE/sample: model evaluations per sample (all guidance branches counted).",
        "class accuracy: share of samples the shipped digit classifier reads as the label asked for (it reads "
        "99.4% of held-out real digits right).",
        "out of [-1, 1]: share of pixel values beyond the data range (real digits: 0%); it counts the least "
        "overshoot too, such as background pixels a hair below -1.",
        "mean excess: mean distance of a pixel value beyond [-1, 1] (0 inside it; real digits: 0), the size of the "
        "over-saturation that high guidance scales cause.",
    ])
    if out is None:
        return
    if out.suffix.lower() != ".png":
        _save(out, res.x.numpy())
        return
    from .images import write_grid

    title = f"{model} · {solver} · {steps} steps · guidance {guidance or 'none'} · seed {seed}"
    try:
        width, height = write_grid(out, res.x[:, 0].numpy(), labels.numpy(), title=title)
    except OSError as e:
        _fail(f"cannot write the image to {out}: {_os_error(e)}", code=1)
    console.print(f"wrote a {width}x{height} grid to {out} (rows: labels 0-9; red/blue: pixels above 1 / below -1)")


DTYPES = ("float32", "float16", "bfloat16")


def _sample_diffusers(ctx, folder, prompt, negative_prompt, solver, steps, guidance, seed, height, width, device,
                      dtype, out, loras, lora_scale):
    """``steer sample --diffusers PATH``: one image from a local diffusers pipeline; solver, steps and guidance
    default to the pipeline's own (its scheduler's matched solver, its num_inference_steps, its CFG scale)."""
    if prompt is None:
        _fail("--diffusers needs --prompt")
    if out is None or out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        _fail("--diffusers needs --out NAME.png (or .jpg) for the image")
    if dtype is not None and dtype not in DTYPES:
        _fail(f"unknown --dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    import torch

    import steer
    from .guidance import parse as parse_guidance
    from .integrations import diffusers as steer_diffusers

    solver_arg = solver if _given(ctx, "solver") else None
    try:
        if solver_arg is not None:
            steer.get_solver(solver_arg)
        if guidance is not None:
            parse_guidance(guidance)
    except ValueError as e:
        _fail(str(e))
    try:
        with console.status(f"loading the pipeline in {folder}"):
            pipe = steer_diffusers.load(folder, dtype=getattr(torch, dtype) if dtype else None, device=device)
    except (OSError, ValueError, TypeError) as e:
        _fail(f"cannot load a diffusers pipeline from {folder}: {e}", code=1)
    if lora_scale is not None and not loras:
        _fail("--lora-scale scales a LoRA: pass --lora PATH")
    for i, path in enumerate(loras):
        try:
            pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as e:
            _fail(f"cannot load the LoRA in {path} into {type(pipe).__name__}: {e}", code=1)
    scale = {} if lora_scale is None else {
        "joint_attention_kwargs" if hasattr(pipe, "transformer") else "cross_attention_kwargs": {"scale": lora_scale}}
    t0 = time.perf_counter()
    try:
        images, res = steer_diffusers.sample(pipe, prompt, negative_prompt=negative_prompt,
                                             guidance="default" if guidance is None else guidance, solver=solver_arg,
                                             steps=steps if _given(ctx, "steps") else None, seed=seed, height=height,
                                             width=width, return_info=True, **scale)
    except steer.NonFiniteError as e:
        _fail(f"sampling failed: {e}", code=1)
    except (ValueError, TypeError, NotImplementedError) as e:
        _fail(str(e))
    wall = time.perf_counter() - t0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        images[0].save(out)
    except OSError as e:
        _fail(f"cannot write the image to {out}: {_os_error(e)}", code=1)
    console.print(f"wrote a {images[0].width}x{images[0].height} image to {out} ({type(pipe).__name__}, "
                  f"{len(res.timesteps) - 1} steps, {res.nfe} NFE, {wall:.1f} s)")


def _save(out, array) -> None:
    try:
        _save_atomic(out, array)
    except OSError as e:
        _fail(f"cannot write the samples to {out}: {_os_error(e)}", code=1)
    console.print(f"saved {tuple(array.shape)} samples to {out}")


def _compare(g, den, labels, seed):
    import torch
    from rich.progress import Progress

    import steer

    z = torch.randn(len(labels), g.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with console.status("solving the reference probability-flow ODE (scipy DOP853, rtol 1e-11)"):
        grid0 = den.path.default_grid(1)
        x_start = z * float(torch.hypot(den.path.alpha(grid0[0]), den.path.sigma(grid0[0])))
        ref = g.ode_solution(x_start, float(grid0[0]), 0.0, den.path, labels)
    table = Table(title=f"RMS error against the exact ODE solution ({den.path.name} path, default grid, "
                        f"{len(labels)} samples)")
    table.add_column("solver")
    for s in COMPARE_STEPS:
        table.add_column(f"{s} steps: error")
        table.add_column("NFE")
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("solvers", total=len(COMPARE_SOLVERS) * len(COMPARE_STEPS))
        for name in COMPARE_SOLVERS:
            row = [name]
            for s in COMPARE_STEPS:
                res = steer.sample(den, noise=z, cond=labels, solver=name, steps=s, return_info=True)
                row += [f"{float((res.x - ref).pow(2).mean().sqrt()):.2e}", str(res.nfe)]
                prog.advance(task)
            table.add_row(*row)
    console.print(table)
    _print_wrapped("error: root mean square, over samples and coordinates, of the difference from a DOP853 solution "
                   "of the same ODE from the same noise (the solver's own error; ~1e-11 is the reference's).",
                   indent=2)


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


@app.command(cls=_Command)
def demo(out: FilePath = typer.Option(FilePath("steer-report"), "--out", help="Folder of the report and database."),
         progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
         config: str = typer.Option("demo", "--config", help="Another sweep of digits-flow cells to show instead.")):
    """Compare the headline guidance methods on the shipped digits model at equal compute: a table here, and a
    report in OUT/index.html (rerunning reuses the finished cells in OUT/results.sqlite)."""
    from .bench import ConfigError, Store, run
    from .bench.metrics import METRICS
    from .bench.report import write_report

    try:
        out.mkdir(parents=True, exist_ok=True)
        db = out / "results.sqlite"
        started = time.perf_counter()
        run(config, db, progress=progress)
        index = write_report(db, out)
    except OSError as e:
        _fail(f"cannot write the demo's report to {out}: {_os_error(e)}", 1)
    except ConfigError as e:
        _fail(str(e))
    store = Store(db)
    rows = [r for r in store.rows() if r["config"]["model"] == "digits-flow"]
    store.close()
    table = Table(title="digits flow model: guidance at equal compute (NFE per sample)")
    for col in ("guidance", "NFE", "steps", "accuracy ↑", "FD ↓", "saturation ↓"):
        table.add_column(col, justify="left" if col == "guidance" else "right")
    for r in rows:
        m = r["result"]["metrics"]
        table.add_row(r["config"]["guidance"], str(r["result"]["nfe"]), str(r["result"]["steps"]),
                      f"{m['accuracy']:.3f}", f"{m['fd']:.1f}", f"{m['saturation']:.4f}")
    console.print(table)
    for name in ("accuracy", "fd", "saturation"):
        console.print(f"[bold]{name}[/]: {escape(METRICS[name][1])}", highlight=False)
    console.print(f"report: {index} ({time.perf_counter() - started:.0f} s)", highlight=False)


testbed_app = typer.Typer(help="Testbed models: train the digits checkpoints.", cls=_Group, no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")
app.add_typer(bench_app, name="bench")
TESTBEDS = ("digits",)


@testbed_app.command("train", cls=_Command)
def testbed_train(
    testbed: str = typer.Argument(..., help=f"Testbed to train: one of {', '.join(TESTBEDS)}."),
    seed: int = typer.Option(0, help="Random seed (the same seed reproduces the weights on one machine)."),
    out: Optional[FilePath] = typer.Option(None, help="Directory for the weights and manifest.json "
                                           "(default: the package's steer/testbeds/weights)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated subset of eps, flow, flow-weak, classifier, "
                                       "noisy-classifier (the manifest keeps the other entries)."),
    smoke: bool = typer.Option(False, "--smoke", hidden=True, help="Tiny networks, a few steps (for tests)."),
):
    """Train the testbed's checkpoints (digits: eps, flow, flow-weak, classifier, noisy-classifier), writing each file
    atomically."""
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
