"""Helpers for the explanation tests: planted models (imported from one place) and run directories."""

from __future__ import annotations

from pathlib import Path

import yaml
from testkit import golden_copy

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "v1"


def planted_model(name: str):
    """A planted model (circuitctl's ground-truth models) built in-process."""
    from circuitctl.testing.planted import build, build_model

    return build_model(build(name))


def planted_run(directory: Path, name: str) -> Path:
    """Discover a circuit on the shipped planted model `name` (circuitctl/data/models/planted-*, tasks/planted-*)
    with exact patching, keeping every edge (so every distractor head is in the circuit)."""
    from circuitctl.config.load import load_config
    from circuitctl.resources import SHIPPED_MODELS
    from circuitctl.runner import discover

    slug = name.replace("_", "-")
    config = {
        "model": {"path": str(SHIPPED_MODELS / f"planted-{slug}"), "device": "cpu"},
        "task": {"name": f"planted-{slug}"},
        "method": {"name": "exact"},
        "selection": {"top_n": 100000, "prune": False},
        "output": {"dir": str(directory / name)},
        "explain": False,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    discover(load_config(path), path.parent)
    return directory / name


def golden_run(directory: Path, name: str) -> Path:
    """A copy of a golden version-1 run directory, with its recorded /tmp/golden paths made real."""
    return golden_copy(name, directory)
