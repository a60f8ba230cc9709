"""The interactive circuit viewer: one self-contained, offline HTML file per circuit.

`payload_from_record` turns a circuit file into the viewer payload (format ``circuitctl.view``),
`render_html` turns a payload into the page, `write_viewer` does both for a run directory
(`refresh_viewer`: the same for a finished run, returning a note instead of raising).
"""

from circuitctl.viewer.page import render_html
from circuitctl.viewer.payload import payload_from_record
from circuitctl.viewer.run_dir import refresh_viewer, run_payload, write_viewer

__all__ = ["payload_from_record", "refresh_viewer", "render_html", "run_payload", "write_viewer"]
