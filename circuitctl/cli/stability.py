"""`circuitctl evaluate stability CONFIG [--bootstrap N] [--seeds K] [--out DIR]`."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from circuitctl.cli.evaluate import console, evaluate_app
from circuitctl.errors import UsageError


@evaluate_app.command("stability")
def stability(
    config: Path = typer.Argument(..., help="run config (YAML), or the name of a shipped config (e.g. demo)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for the config"),
    bootstrap: int = typer.Option(20, "--bootstrap", help="bootstrap resamples of the task's examples"),
    seeds: int = typer.Option(1, "--seeds", help="seeds per resample, for methods whose result depends on the seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write stability.json/.png (default: OUTPUT_DIR/stability, or runs/<task>-<method>-stability-<time>)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier stability.json/.png in the output directory"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted stability analysis from its checkpoint in DIR"),
    rerun: bool = typer.Option(False, "--rerun", help="rerun EAP / EAP-IG on every resample instead of reusing per-example score contributions (a check: same circuits)"),
) -> None:
    """Rerun discovery on bootstrap resamples of the examples: how often each unit is chosen, and the core circuit."""
    from circuitctl.analysis.stability import stability as run_stability
    from circuitctl.config.load import find_config, load_config

    config = find_config(config)
    run_config = load_config(config, list(overrides or []))
    if resume is not None and out is not None and Path(out) != Path(resume):
        raise UsageError("--resume DIR continues the analysis in DIR; leave out --out or give the same directory")
    out_dir = resume or out or default_out_dir(run_config)
    summary = run_stability(run_config, config.parent, out_dir, bootstrap, seeds, force, resume is not None, rerun)
    console.print(stability_table(summary.record, summary.files))
    for note in summary.notes:
        console.print(f"note: {note}")


def default_out_dir(config) -> Path:
    if config.output.dir:
        return Path(config.output.dir) / "stability"
    task = config.task.name or Path(config.task.path or "task").stem
    return Path("runs") / f"{task}-{config.method.name}-stability-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def stability_table(record: dict, files: list[str]) -> Table:
    from rich.markup import escape

    from circuitctl.metrics.faithfulness import format_f

    unit = record["unit"]
    table = Table(title=f"stability of {record['method']}'s circuit under {record['n_resamples']} resamples", show_header=False)
    seeds = f" x {record['n_seeds']} seeds" if record["n_seeds"] > 1 else ""
    table.add_row("runs", f"{record['n_runs']} ({record['n_resamples']} resamples of {record['n_examples']} examples{seeds}; {record['how']})")
    size = record["circuit_size"]
    table.add_row(f"{unit} in circuit", f"all the data: {size['full']}; resamples: mean {size['mean']:.1f}, {size['min']}-{size['max']}")
    j = record["jaccard"]
    table.add_row("Jaccard between resamples", f"mean {j['mean']:.3f}, min {j['min']:.3f}")
    table.add_row("Jaccard with the full-data circuit", f"mean {j['vs_full']['mean']:.3f}, min {j['vs_full']['min']:.3f}")
    for key, what in (("spearman_vs_full", "scores"), ("spearman_abs_vs_full", "|scores|")):
        rho = record[key]
        table.add_row(f"Spearman of {what} with the full data", "n/a" if rho is None else f"mean {rho['mean']:.3f}, min {rho['min']:.3f}")
    f = record["faithfulness"]
    table.add_row(f"core (in >= {100 * record['core_frequency']:.0f} %)", f"{len(record['core'])} {unit}; f(core) = {format_f(f['core'])}")
    table.add_row("f of the full-data circuit", format_f(f["full_circuit"]))
    contingent = record["contingent"]
    units = record[unit]
    shown = ", ".join(f"{escape(name)} ({units[name]['frequency']:.2f})" for name in contingent[:8])
    more = f", ... ({len(contingent) - 8} more)" if len(contingent) > 8 else ""
    table.add_row("contingent (frequency)", f"{len(contingent)} {unit}: {shown}{more}" if contingent else "none")
    if f["undefined"]:
        table.add_row("note", f["undefined"])
    table.add_row("written", ", ".join(files))
    return table
