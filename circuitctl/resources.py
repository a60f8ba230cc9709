"""What circuitctl ships: tasks, small models and configs, found inside the installed package.

They live in ``circuitctl/data/`` (package data; the repository's ``tasks/``, ``models/`` and
``configs/`` are links to it), so a regular ``pip install .`` finds them from any working
directory. Paths in configs are resolved against the working directory, the config's own
directory, and then this data directory, so the shipped configs' ``models/toy-gpt`` and
``tasks/...`` work wherever they are run from.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_root() -> Path:
    """The shipped data directory (a real directory: circuitctl is never installed zipped)."""
    return Path(str(resources.files("circuitctl").joinpath("data")))


SHIPPED_TASKS = data_root() / "tasks"
SHIPPED_MODELS = data_root() / "models"
SHIPPED_CONFIGS = data_root() / "configs"


def resolve_path(value: str, config_dir: Path | None) -> Path:
    """A path from a config: as given (relative to the working directory) if it exists,
    else relative to the config file's directory, else relative to the shipped data."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for base in (config_dir, data_root()):
        if base is not None and (base / path).exists():
            return base / path
    return path


def shipped_config_names() -> list[str]:
    """Shipped run configs by name (``demo``, ``mib/gpt2-ioi-eap-ig``, ...)."""
    if not SHIPPED_CONFIGS.is_dir():
        return []
    return sorted(str(p.relative_to(SHIPPED_CONFIGS).with_suffix("")) for p in SHIPPED_CONFIGS.rglob("*.yaml"))


def shipped_config(name: str) -> Path | None:
    """The shipped config called `name` (with or without ``.yaml``), or None."""
    stem = name.removesuffix(".yaml").removeprefix("configs/")
    path = SHIPPED_CONFIGS / f"{stem}.yaml"
    return path if path.is_file() else None


def copy_config(name: str, destination: Path) -> Path:
    """Copy the shipped config `name` to `destination` (a new file, or into an existing directory)."""
    import shutil

    from circuitctl.errors import UsageError

    source = shipped_config(name)
    if source is None:
        raise UsageError(f"'{name}' is not a shipped config")
    target = destination / source.name if destination.is_dir() else destination
    if target.exists():
        raise UsageError(f"'{target}' already exists; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target
