"""`circuitctl train-sae CONFIG [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from circuitctl.cli.app import app

console = Console(highlight=False)


@app.command("train-sae")
def train_sae(
    config: Path = typer.Argument(..., help="train-sae config (YAML)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. steps=2000 output.dir=saes/x"),
    force: bool = typer.Option(False, "--force", help="replace the files of a non-empty output directory"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue an interrupted training from its checkpoint in DIR"),
) -> None:
    """Train SAEs (ReLU + L1, or TopK) on a model's activations; write them in sae-lens's format."""
    from circuitctl.sae.config import load_train_config

    train_config = load_train_config(config, overrides or [])
    from circuitctl.sae.training_run import train_from_config

    summary = train_from_config(train_config, config.parent, force=force, resume=resume)
    table = Table(title=f"SAEs trained on {summary.token_origin}")
    for column in ("site", "d_sae", "expl. var.", "L0", "dead", "loss rec.", "CE clean/SAE/zero"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for m in summary.metrics:
        table.add_row(
            m.site, str(m.d_sae), f"{m.explained_variance:.3f}", f"{m.l0:.1f}", f"{m.dead_fraction:.0%}",
            f"{m.loss_recovered:.3f}", f"{m.ce_clean:.2f}/{m.ce_with_sae:.2f}/{m.ce_zero_ablation:.2f}",
        )
    console.print(table)
    architecture = summary.metrics[0].architecture if summary.metrics else ""
    console.print(f"{architecture} SAEs written to {summary.out_dir} (sae-lens format; metrics.json) in {summary.seconds:.1f}s")
