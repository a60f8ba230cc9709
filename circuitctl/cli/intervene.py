"""`circuitctl intervene CONFIG --ablate SPEC [--mode remove|keep] [--tasks ...] [--text FILE] [--export DIR] [--out DIR]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from circuitctl.cli.app import app

console = Console(highlight=False)


@app.command()
def intervene(
    config: Path = typer.Argument(..., help="run config (YAML) or a shipped config's name: model, task, ablation, metric, batch size"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides for the config, e.g. ablation=zero"),
    ablate: str = typer.Option(
        ..., "--ablate", help="what to ablate: a run directory (its circuit), RUN:top=N, RUN:group=ID, RUN:top=N:by=spurious, or unit names (a1.h0,a1.h3 | m0.n3 | resid0/f12)"
    ),
    mode: str = typer.Option("remove", "--mode", help="remove: ablate these units; keep: ablate every other unit"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="more tasks to measure side effects on, comma-separated: shipped tasks, generators or paths"),
    text: Optional[Path] = typer.Option(None, "--text", help="a text file, or JSON lines of token-id lists: the model's next-token loss before and after"),
    export: Optional[Path] = typer.Option(None, "--export", help="write the edited model as a local checkpoint here (zero / position-independent mean ablation of heads, MLPs, neurons)"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write intervention.json/.md/.png (default: runs/<task>-intervene-<time>)"),
    force: bool = typer.Option(False, "--force", help="replace earlier intervention files (and a non-empty --export directory)"),
) -> None:
    """Ablate what a circuit found (or everything else) and measure what changes, on the task and off it."""
    from circuitctl.config.load import find_config, load_config

    config = find_config(config)
    run_config = load_config(config, list(overrides or []))
    from circuitctl.interventions.run import intervene as run_intervention

    task_list = [t for t in tasks.split(",")] if tasks else []
    result = run_intervention(run_config, config.parent, ablate, mode, task_list, text, export, out, force)
    console.print(effect_table(result.record))
    if result.record.get("text"):
        t = result.record["text"]
        console.print(f"next-token loss on {t['file']}: {t['loss_before']:.4f} -> {t['loss_after']:.4f} ({t['loss_change']:+.4f}; {t['ablation']})")
    for note in result.notes:
        console.print(f"note: {note}")
    if result.files:
        console.print("written: " + ", ".join(str(f) for f in result.files))


def effect_table(record: dict) -> Table:
    from circuitctl.metrics.faithfulness import format_f

    n = record["n_ablated"]
    table = Table(title=f"{record['mode']} {record['spec']}: {n} of {record['n_total']} {record['unit']} ablated ({record['ablation']['type']})")
    for name in ("task", "metric", "before", "after", "f", "accuracy", "top-1"):
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    for task, t in record["tasks"].items():
        table.add_row(
            task,
            t["metric"],
            f"{t['metric_before']:+.3f}",
            f"{t['metric_after']:+.3f}",
            format_f(t["faithfulness"], 3),
            f"{t['accuracy_before']:.2f} -> {t['accuracy_after']:.2f}",
            f"{t['top1_accuracy_before']:.2f} -> {t['top1_accuracy_after']:.2f}",
        )
    return table
