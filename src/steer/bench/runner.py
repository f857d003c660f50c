"""Run a sweep into a store: every cell not yet in the database, one transaction each, with a progress bar.

    python -m steer.bench.run CONFIG_OR_PRESET --db results.sqlite
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import __version__
from ..models import get_model
from ..sampling import sample
from .config import Cell, claim_cells, load_sweep
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


def steps_for_budget(cell: Cell, model, device) -> int:
    """The most steps whose NFE per sample is at most ``cell.nfe``, counted on one sample (NFE per sample does
    not depend on the batch; it can on the sample for Adaptive Guidance, whose latch the count then follows)."""
    guidance = None if cell.guidance == "none" else cell.guidance

    def nfe(steps):
        return sample(model, cond=labels_for(cell.model, 1), guidance=guidance, solver=cell.solver, steps=steps,
                      seed=cell.seed, device=device, return_info=True).nfe

    if nfe(1) > cell.nfe:
        raise ValueError(f"{cell.guidance} with {cell.solver} needs {nfe(1)} NFE for one step, over the budget "
                         f"{cell.nfe}")
    lo, hi = 1, cell.nfe  # nfe(steps) >= steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if nfe(mid) <= cell.nfe else (lo, mid - 1)
    return lo


def run_cell(cell: Cell, model, device=None) -> tuple[dict, "torch.Tensor"]:
    """Sample one cell and measure it: metrics, NFE per sample, steps, wall time, peak memory."""
    labels = labels_for(cell.model, cell.samples)
    steps = cell.steps if cell.nfe is None else steps_for_budget(cell, model, device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = sample(model, cond=labels, guidance=None if cell.guidance == "none" else cell.guidance, solver=cell.solver,
                 steps=steps, seed=cell.seed, device=device, return_info=True)
    wall = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"metrics": evaluate(cell.model, res.x, labels, cell.metrics, cell.seed), "nfe": res.nfe,
              "steps": steps, "wall_s": wall, "peak_bytes": peak}
    return result, res.x


def run(source: "str | Path", db: "str | Path", progress: bool = True) -> dict:
    """Run every cell of the sweep ``source`` (a TOML file or a preset) that ``db`` does not hold yet; returns
    the store's status.

    Under ``torchrun --nproc-per-node N`` (one machine or many) rank r owns every N-th cell of the sweep, a split
    that does not depend on what the other ranks have finished, and runs those not yet done, on GPU
    ``LOCAL_RANK`` where there is one; all ranks write to the same database (SQLite serialises the writers) and
    meet at a barrier (gloo) before the status is read."""
    sweep, cells = load_sweep(source)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}") if torch.cuda.is_available() else None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if rank == 0:  # rank 0 creates the database; the others open it after the barrier
        first = Store(db)
        first.register_sweep(sweep.name, [c.key for c in cells])
        first.register_claims([{**claim.model_dump(), "method_keys": [c.key for c in m],
                                "baseline_keys": [c.key for c in b]}
                               for claim in sweep.claims for m, b in [claim_cells(sweep, claim)]])
        first.close()
    if dist.is_initialized():
        dist.barrier()
    store = Store(db)
    done = store.done()
    todo = [c for c in cells[rank::world] if c.key not in done]
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
                model = get_model(cell.model)
                models[cell.model] = model.to(device) if device is not None and hasattr(model, "to") else model
            result, x = run_cell(cell, models[cell.model], device)
            store.put(cell.key, cell.config(), {**result, "env": env}, x.float().cpu().numpy())
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
    if dist.is_initialized():
        dist.barrier()
    status = store.status()
    store.close()
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steer.bench.run",
                                 description="Run a steer benchmark sweep into a SQLite database (resumable).")
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
