"""`circuit.html` for a run directory: its circuit file (read by `load_circuit_file`, so our files
of either schema version and MIB files alike), faithfulness.json and explanation.json."""

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
    from circuitctl.circuits.record import load_circuit_file

    loaded = load_circuit_file(_circuit_file(run_dir))
    extras = {}
    for name, key in ((FAITHFULNESS, "faithfulness"), (EXPLANATION, "explanation")):
        path = Path(run_dir) / name
        extras[key] = _read_json(path, name) if path.is_file() else None
    try:
        return payload_from_record(loaded.record, **extras)
    except UsageError as exc:
        raise UsageError(f"{loaded.origin}: {exc}") from exc


def write_viewer(run_dir: Path) -> Path:
    """Write (or rewrite) RUN_DIR/circuit.html and return its path."""
    html = render_html(run_payload(run_dir))
    path = Path(run_dir) / PAGE
    write_atomic(path, html)
    return path


def refresh_viewer(run_dir: Path) -> tuple[Path | None, str | None]:
    """`write_viewer` for a finished run: (the page, None), or (None, a note saying why there is
    no page). Never raises: a viewer problem must not fail a run whose results are written."""
    try:
        return write_viewer(run_dir), None
    except Exception as exc:  # noqa: BLE001 - any failure becomes the note
        return None, f"{Path(run_dir) / PAGE} was not written: {exc}"
