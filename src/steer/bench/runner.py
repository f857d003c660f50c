"""Run a sweep into a store: every cell not yet in the database, one transaction each, with a progress bar.

    python -m steer.bench.runner CONFIG_OR_PRESET --db results.sqlite
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from ..models import get_model
from ..sampling import sample
from .config import Cell, load_sweep
from .metrics import evaluate, labels_for
from .store import Store

__all__ = ["run", "run_cell"]


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_cell(cell: Cell, model) -> tuple[dict, "torch.Tensor"]:
    """Sample one cell and measure it: metrics, NFE per sample, wall time, peak memory."""
    labels = labels_for(cell.model, cell.samples)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = sample(model, cond=labels, guidance=None if cell.guidance == "none" else cell.guidance, solver=cell.solver,
                 steps=cell.steps, seed=cell.seed, return_info=True)
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"metrics": evaluate(cell.model, res.x, labels, cell.metrics, cell.seed), "nfe": res.nfe,
              "wall_s": wall, "peak_bytes": peak}
    return result, res.x


def run(source: "str | Path", db: "str | Path", progress: bool = True) -> dict:
    """Run every cell of the sweep ``source`` (a TOML file or a preset) that ``db`` does not hold yet; returns
    the store's status."""
    sweep, cells = load_sweep(source)
    store = Store(db)
    store.register_sweep(sweep.name, [c.key for c in cells])
    todo = [c for c in cells if c.key not in store.done()]
    env = {"steer": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "git": _git_revision()}
    models: dict = {}
    bar = None
    if progress and todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"{sweep.name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        bar.start()
        task = bar.add_task(sweep.name, total=len(todo))
    try:
        for cell in todo:
            if cell.model not in models:
                models[cell.model] = get_model(cell.model)
            result, x = run_cell(cell, models[cell.model])
            store.put(cell.key, cell.config(), {**result, "env": env}, x.float().cpu().numpy())
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    status = store.status()
    store.close()
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run a steer benchmark sweep into a SQLite database (resumable).")
    ap.add_argument("config", help="a TOML sweep file or a preset name")
    ap.add_argument("--db", required=True, help="the results database (created if missing)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from .config import ConfigError

    try:
        status = run(args.config, args.db, progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{status['done']}/{status['total']} cells done in {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
