"""``steer bench run | status``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console

from .._typer import Command, Group
from .config import PRESETS, ConfigError
from .runner import run as run_sweep
from .store import Store

app = typer.Typer(help="Benchmark sweeps: run a TOML config or preset into a resumable SQLite database.",
                  no_args_is_help=True, cls=Group)
err = Console(stderr=True)


@app.command(cls=Command)
def run(config: str = typer.Argument(..., help=f"a TOML sweep file, or a preset: {', '.join(PRESETS)}"),
        db: Path = typer.Option(..., "--db", help="the results database (created if missing)"),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar")):
    """Run every cell of the sweep that the database does not hold yet (rerun after a kill to resume)."""
    try:
        status = run_sweep(config, db, progress=progress)
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    typer.echo(f"{status['done']}/{status['total']} cells done in {db}")


@app.command(cls=Command)
def report(db: Path = typer.Option(..., "--db", help="the results database"),
           out: Path = typer.Option(Path("steer-report"), "--out", help="the folder to write (index.html, grids/)")):
    """Write a static HTML report: tables, metric-vs-scale curves, Pareto fronts, NFE-matched methods, grids."""
    from .report import claim_results, write_report

    if not db.exists():
        err.print(f"[red]error:[/red] no database at {db}", highlight=False)
        raise typer.Exit(1)
    index = write_report(db, out)
    store = Store(db)
    claims = claim_results(store)
    store.close()
    if claims:
        from rich.table import Table

        table = Table("claim", "arXiv", "verdict", box=None)
        for c in claims:
            arxiv = re.search(r"arXiv (\S+?)\)", c["paper"])
            table.add_row(c["id"], arxiv[1] if arxiv else "-", c["verdict"])
        Console().print(table)
    typer.echo(f"report written to {index}")


@app.command(cls=Command)
def status(db: Path = typer.Option(..., "--db", help="the results database"),
           as_json: bool = typer.Option(False, "--json", help='print {"done": N, "total": N, "sweeps": {...}}')):
    """How many cells of the sweeps run into this database are done."""
    if not db.exists():
        err.print(f"[red]error:[/red] no database at {db}", highlight=False)
        raise typer.Exit(1)
    store = Store(db)
    st = store.status()
    store.close()
    if as_json:
        typer.echo(json.dumps(st))
    else:
        for name, s in st["sweeps"].items():
            typer.echo(f"{name}: {s['done']}/{s['total']} cells")
