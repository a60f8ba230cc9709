"""`circuitctl view RUN_DIR [--open]`: (re)write RUN_DIR/circuit.html and optionally open it."""

from __future__ import annotations

import os
import sys
import webbrowser
from pathlib import Path

import typer
from rich.console import Console

from circuitctl.cli.app import app

console = Console(highlight=False)


def _has_gui_browser() -> bool:
    """A graphical browser can open here (not a remote box without a display)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


@app.command()
def view(
    run_dir: Path = typer.Argument(..., help="a run directory (holds circuit.json)"),
    open_page: bool = typer.Option(False, "--open/--no-open", help="open the page in a browser when one is available"),
) -> None:
    """Write circuit.html: an interactive view of the circuit that opens from disk, offline."""
    from circuitctl.viewer import write_viewer

    path = write_viewer(run_dir)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB, self-contained: open it in any browser)", soft_wrap=True)
    if not open_page:
        return
    if _has_gui_browser() and webbrowser.open(path.resolve().as_uri()):
        console.print("opened it in the browser")
    else:
        console.print(f"no browser available here: copy {path} to a machine with one and open it there", soft_wrap=True)
