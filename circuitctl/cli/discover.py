"""`circuitctl discover CONFIG [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from circuitctl.cli.app import app
from circuitctl.errors import UsageError

console = Console(highlight=False)


@app.command()
def discover(
    config: Optional[Path] = typer.Argument(None, help="run config (YAML), or the name of a shipped config (e.g. demo)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. output.dir=runs/x method.name=eap"),
    force: bool = typer.Option(False, "--force", help="replace the files of an existing run directory"),
    rerun: Optional[Path] = typer.Option(None, "--from", help="rerun the config recorded in an earlier run directory"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted run (ACDC, path patching, EAP-IG, exact patching, CD-T) from its checkpoint in RUN_DIR"),
    reselect: bool = typer.Option(False, "--reselect", help="re-select the circuit of a method that chooses its own (ACDC, path patching, CD-T, SFC) by score, with the config's selection rule"),
    allow_small_gap: bool = typer.Option(False, "--allow-small-gap", help="run even when the task has no clean-corrupt gap (same as checks.allow_small_gap=true)"),
) -> None:
    """Discover a circuit and write circuit.json, circuit.mib.json, circuit.dot (and .svg)."""
    from circuitctl.config.load import find_config, load_config

    if rerun is not None:
        if config is not None:
            overrides = [str(config)] + list(overrides or [])
        config = rerun / "config.yaml"
        if not config.is_file():
            raise UsageError(f"--from: '{rerun}' has no config.yaml (not a run directory)")
    if config is None:
        raise UsageError("give a config file (or --from RUN_DIR)")
    config = find_config(config)
    extra = (["selection.reselect=true"] if reselect else []) + (["checks.allow_small_gap=true"] if allow_small_gap else [])
    run_config = load_config(config, list(overrides or []) + extra)
    from circuitctl.runner import discover as run_discovery

    summary = run_discovery(run_config, config.parent, force=force, resume=resume)
    console.print(summary_table(summary))
    if summary.sweep:
        console.print(sweep_table(summary.sweep, summary.unit))
    for note in summary.notes:
        console.print(f"note: {escape(note)}")


def summary_table(summary) -> Table:
    from circuitctl.metrics.faithfulness import format_f

    table = Table(title=f"circuit discovered with {summary.method}", show_header=False)
    table.add_row("run directory", escape(str(summary.run_dir)))  # paths and notes are text, never markup
    if summary.sweep:  # several circuits: their numbers are in the sweep table
        table.add_row(f"{summary.unit} in the graph", str(summary.n_total))
        table.add_row("metric: full / empty", f"{summary.m_full:.4f} / {summary.m_empty:.4f}")
    else:
        table.add_row(f"{summary.unit} in circuit", f"{summary.n_in_circuit} of {summary.n_total}")
        table.add_row("nodes in circuit", str(summary.n_nodes_in_circuit))
        table.add_row("metric: full / empty / circuit", f"{summary.m_full:.4f} / {summary.m_empty:.4f} / {summary.m_circuit:.4f}")
        table.add_row("normalized faithfulness f(C)", format_f(summary.faithfulness))
    table.add_row("circuit chosen by", summary.chosen_by)
    table.add_row("time (load / discovery / evaluation)", " / ".join(f"{summary.seconds[k]:.1f}s" for k in ("load", "discovery", "evaluation")))
    table.add_row("files", ", ".join(summary.files))
    return table


def sweep_table(rows: list[dict], unit: str) -> Table:
    """One row per circuit of a sweep: its parameter, units kept and faithfulness."""
    from circuitctl.metrics.faithfulness import format_f

    fixed = ("label", "n_in_circuit", "n_nodes_in_circuit", "metric_circuit", "faithfulness")
    params = [key for key in rows[0] if key not in fixed]
    table = Table(title="sweep: one circuit per value (subdirectories of the run directory)")
    for name in ["circuit", *params, f"{unit} kept", "nodes", "metric", "f(C)"]:
        table.add_column(name, justify="left" if name == "circuit" else "right")
    for row in rows:
        values = [f"{row[key]:g}" if isinstance(row[key], float) else str(row[key]) for key in params]
        table.add_row(
            row["label"], *values, str(row["n_in_circuit"]), str(row["n_nodes_in_circuit"]), f"{row['metric_circuit']:.4f}", format_f(row["faithfulness"])
        )
    return table
