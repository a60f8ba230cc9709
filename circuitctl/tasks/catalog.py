"""The list of available tasks: shipped task directories and prompt-pair generators."""

from __future__ import annotations

from pathlib import Path

from circuitctl.registry import unknown_name_message


def generator_names() -> list[str]:
    try:
        from circuitctl.tasks.generators import GENERATORS
    except ImportError:  # generators are optional
        return []
    return sorted(GENERATORS)


def generator_metric(name: str) -> str | None:
    """The metric a generator's task is measured with by default (None: the run's default)."""
    from circuitctl.tasks.generators import get_generator

    return get_generator(name).metric


def shipped_task_names(shipped_dir: Path) -> list[str]:
    if not shipped_dir.is_dir():
        return []
    return sorted(p.parent.name for p in shipped_dir.glob("*/task.yaml"))


def unknown_task_message(name: str, shipped_dir: Path) -> str:
    return unknown_name_message("task", name, shipped_task_names(shipped_dir) + generator_names())


def copy_task(name: str, destination: Path, shipped_dir: Path) -> list[Path]:
    """Copy a shipped task (spec + pairs) or a generator's spec into `destination` for editing."""
    import shutil

    import yaml

    from circuitctl.errors import UsageError

    if destination.exists() and any(destination.iterdir()):
        raise UsageError(f"'{destination}' exists and is not empty; choose a new directory")
    source = shipped_dir / name
    if (source / "task.yaml").is_file():
        shutil.copytree(source, destination, dirs_exist_ok=True)
        return sorted(destination.iterdir())
    if name not in generator_names():
        raise UsageError(unknown_task_message(name, shipped_dir))
    from circuitctl.tasks.generators import get_generator

    info = get_generator(name)
    spec = {
        "name": name,
        "version": 1,
        "description": info.description,
        "generator": name,
        "options": dict(info.options),
        "n_pairs": 100,
    }
    if info.metric:
        spec["metric"] = info.metric
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / "task.yaml"
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return [target]
