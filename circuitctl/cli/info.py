"""`circuitctl tasks` and `circuitctl methods`: what is available."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from circuitctl.cli.app import app

console = Console(highlight=False)


@app.command()
def methods() -> None:
    """List the discovery methods."""
    from circuitctl.config.methods import METHODS

    table = Table("method", "description")
    for name in METHODS.names():
        table.add_row(name, METHODS.get(name).description)
    console.print(table)


@app.command("cp")
def copy(
    name: str = typer.Argument(..., help="a shipped task, a task generator (circuitctl tasks) or a shipped config (e.g. demo)"),
    destination: Path = typer.Argument(..., help="a new directory (a task) or file (a config)"),
) -> None:
    """Copy a shipped task into DIR for editing (use it with task: {path: DIR}), or a shipped config."""
    from circuitctl.resources import SHIPPED_TASKS, copy_config, shipped_config
    from circuitctl.tasks.catalog import copy_task, shipped_task_names

    if shipped_config(name) is not None and name not in shipped_task_names(SHIPPED_TASKS):
        target = copy_config(name, destination)
        console.print(f"copied config {name} to {target}")
        return
    files = copy_task(name, destination, SHIPPED_TASKS)
    console.print(f"copied {name} to {destination}: {', '.join(f.name for f in files)}")


@app.command()
def tasks() -> None:
    """List the shipped tasks and the prompt-pair generators."""
    from circuitctl.resources import SHIPPED_TASKS
    from circuitctl.tasks.catalog import generator_names, shipped_task_names
    from circuitctl.tasks.records import read_spec

    table = Table("task", "kind", "description")
    for name in shipped_task_names(SHIPPED_TASKS):
        spec = read_spec(SHIPPED_TASKS / name / "task.yaml")
        table.add_row(name, "shipped", spec.description)
    for name in generator_names():
        from circuitctl.tasks.generators import GENERATORS

        table.add_row(name, "generator", getattr(GENERATORS[name], "description", ""))
    console.print(table)
