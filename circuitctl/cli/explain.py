"""`circuitctl explain RUN_DIR [--force]`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from circuitctl.cli.app import app

console = Console(highlight=False)


@app.command()
def explain(
    run_dir: Path = typer.Argument(..., help="a run directory written by discover"),
    force: bool = typer.Option(False, "--force", help="replace an earlier explanation"),
) -> None:
    """Explain a circuit: each node's roles, attention and direct logit attribution, groups of
    heads doing the same job, composition scores; writes explanation.json / .md and drawings."""
    from circuitctl.explain.pipeline import explain_run

    summary = explain_run(run_dir, force=force)
    table = Table(title=f"{summary.kind} circuit explained: {summary.run_dir}")
    table.add_column("node")
    table.add_column("roles; top attention target; direct logit attribution")
    for name, text in summary.nodes.items():
        table.add_row(name, text)
    console.print(table)
    for gid, name in summary.groups:
        console.print(f"group {gid}: {name}")
    console.print(f"files: {', '.join(summary.files)} ({summary.seconds:.1f}s)")
    for note in summary.notes:
        console.print(f"note: {note}")
