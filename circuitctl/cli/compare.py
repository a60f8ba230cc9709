"""`circuitctl compare RUN_DIR RUN_DIR [...] [--out DIR]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from circuitctl.cli.app import app

console = Console(highlight=False)


@app.command()
def compare(
    runs: List[Path] = typer.Argument(..., help="two or more run directories (or circuit files) on the same model and graph"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write compare.json/.md/.png (default: runs/compare-<time>)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier comparison in the output directory"),
) -> None:
    """Compare circuits: overlap (Jaccard), rank correlation of scores, faithfulness side by side."""
    from circuitctl.analysis.compare import compare as run_compare

    summary = run_compare(list(runs), out, force)
    console.print(runs_table(summary.record))
    console.print(pairs_table(summary.record))
    for note in summary.notes:
        console.print(f"note: {escape(note)}")
    console.print(f"written: {', '.join(summary.files)}")


def runs_table(record: dict) -> Table:
    from circuitctl.metrics.faithfulness import format_f

    table = Table(title=f"{len(record['runs'])} runs ({record['kind']} circuits)")
    for column in ("run", "method", record["unit"], "nodes", "f", "completeness", "CPR", "CMD"):
        table.add_column(column)
    for r in record["runs"]:
        numbers = [format_f(r[k], 3) if r["faithfulness_file"] else "n/a" for k in ("faithfulness", "completeness", "cpr", "cmd")]
        table.add_row(escape(r["label"]), escape(str(r["method"] or "-")), f"{r['n_in_circuit']} of {r['n_total']}", str(r["n_nodes_in_circuit"]), *numbers)
    return table


def pairs_table(record: dict) -> Table:
    table = Table(title="pairs")
    for column in ("a", "b", "Jaccard", "Jaccard (nodes)", "shared / only a / only b", "Spearman: scores / |scores|"):
        table.add_column(column)
    for p in record["pairs"]:
        rho = " / ".join("n/a" if r is None else f"{r:.3f}" for r in (p["spearman"], p["spearman_abs"]))
        table.add_row(escape(p["a"]), escape(p["b"]), f"{p['jaccard']:.3f}", f"{p['node_jaccard']:.3f}", f"{p['n_shared']} / {p['n_only_a']} / {p['n_only_b']}", rho)
    return table
