"""`circuitctl validate CONFIG`: check a config without importing torch."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from circuitctl.cli.app import app, err_console


@app.command()
def validate(
    config: Path = typer.Argument(..., help="run config (YAML), or the name of a shipped config (e.g. demo)"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. method.name=eap"),
) -> None:
    """Check a config (a discovery run or a train-sae config): schema, names, files. Loads no model."""
    from circuitctl.config.load import find_config, load_config, read_yaml
    from circuitctl.session import check_model_source, read_task_source

    config = find_config(config)
    data, _ = read_yaml(config)
    if isinstance(data, dict) and "sites" in data and "method" not in data:
        from circuitctl.sae.config import load_train_config

        load_train_config(config, overrides or [])
        err_console.print(f"[green]ok[/]: {config} is a valid train-sae config")
        return
    run_config = load_config(config, overrides or [])
    task = read_task_source(run_config, config.parent)
    if task.spec.generator is not None:
        from circuitctl.errors import UsageError
        from circuitctl.tasks.generators import check_options

        try:
            check_options(task.spec.generator, {**task.spec.options, **run_config.task.options})
        except UsageError as problem:
            raise UsageError(f"task.options: {problem}") from None
    check_model_source(run_config, config.parent, require_weights=False)
    err_console.print(f"[green]ok[/]: {config} is valid (method {run_config.method.name}, metric {run_config.metric})")
    if run_config.model.name is not None:
        from circuitctl.models.sources import pretrained_cache_note

        note = pretrained_cache_note(run_config.model.name)
        if note:
            err_console.print(f"note: {note}", highlight=False, markup=False)
