"""`circuit.html` for a run directory: circuit.json (+ faithfulness.json, explanation.json)."""

from __future__ import annotations

import json
from pathlib import Path

from circuitctl.errors import UsageError
from circuitctl.io.files import write_atomic
from circuitctl.viewer.page import render_html
from circuitctl.viewer.payload import payload_from_record

CIRCUIT, FAITHFULNESS, EXPLANATION, PAGE = "circuit.json", "faithfulness.json", "explanation.json", "circuit.html"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the {what}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: the {what} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the {what} is not a JSON object")
    return data


def _circuit_file(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UsageError(f"run directory '{run_dir}' does not exist")
    if not run_dir.is_dir():
        raise UsageError(f"'{run_dir}' is not a run directory (give the directory that holds {CIRCUIT})")
    path = run_dir / CIRCUIT
    if not path.is_file():
        points = sorted(p.parent.name for p in run_dir.glob(f"*/{CIRCUIT}"))
        hint = f"; a sweep keeps one circuit per subdirectory: {', '.join(points[:5])}" if points else ""
        raise UsageError(f"'{run_dir}' holds no {CIRCUIT} (not a run directory){hint}")
    return path


def run_payload(run_dir: Path) -> dict:
    """The viewer payload of a run directory, with its faithfulness curve and explanation if present."""
    record = _read_json(_circuit_file(run_dir), "circuit file")
    extras = {}
    for name, key in ((FAITHFULNESS, "faithfulness"), (EXPLANATION, "explanation")):
        path = Path(run_dir) / name
        extras[key] = _read_json(path, name) if path.is_file() else None
    return payload_from_record(record, **extras)


def write_viewer(run_dir: Path) -> Path:
    """Write (or rewrite) RUN_DIR/circuit.html and return its path."""
    html = render_html(run_payload(run_dir))
    path = Path(run_dir) / PAGE
    write_atomic(path, html)
    return path
