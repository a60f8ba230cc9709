"""One self-contained HTML page per circuit: the viewer's JavaScript and CSS inline, the payload
embedded as JSON, nothing fetched (a Content-Security-Policy forbids any request), so it opens
from ``file://`` on a laptop with no server and no network.

The payload is embedded in a compact columnar form (arrays instead of one object per edge) so
a GPT-2-small graph (32k scored edges) stays well under 5 MB. Every string in it reaches the
page only through ``JSON.parse`` and ``textContent``; ``<``, ``>`` and ``&`` are written as
``\\u003c``-style escapes so no name can close the script tag or open a comment.
"""

from __future__ import annotations

import json
import math
from importlib import resources

CHANNEL_CODE = {None: 0, "q": 1, "k": 2, "v": 3}
_PLACEHOLDERS = ("/*@CSS@*/", "/*@JS@*/", "@DATA@")


def render_html(payload: dict) -> str:
    """The viewer page for a payload (see circuitctl.viewer.payload)."""
    template = _asset("template.html")
    css, js = _asset("viewer.css"), _asset("viewer.js")
    data = _script_safe(json.dumps(compact(payload), separators=(",", ":"), allow_nan=False))
    for marker, text in zip(_PLACEHOLDERS, (css, js, data)):
        if template.count(marker) != 1:
            raise RuntimeError(f"viewer template: expected one {marker}")
    # data last: its text is never searched for markers
    head, tail = template.split("@DATA@")
    head = head.replace("/*@CSS@*/", css)
    tail = tail.replace("/*@JS@*/", js)
    return head + data + tail


def _asset(name: str) -> str:
    return resources.files("circuitctl.viewer").joinpath("assets", name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """JSON that can sit inside <script>: no `</script>`, `<!--` or `]]>` can form."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _score(value) -> float | None:
    """Scores to 9 significant digits: exact for float32, so the page ranks as Python does."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.9g}")


def compact(payload: dict) -> dict:
    """The payload with nodes and edges as columns of arrays (node references by index)."""
    nodes = payload["nodes"]
    index = {}
    for i, node in enumerate(nodes):
        if node["id"] in index:
            raise ValueError(f"viewer payload: node '{node['id']}' is listed twice")
        index[node["id"]] = i
    edges = payload["edges"]
    for edge in edges:
        for end in ("source", "target"):
            if edge[end] not in index:
                raise ValueError(f"viewer payload: edge {edge['source']}->{edge['input']} names the unknown node '{edge[end]}'")
        if edge["channel"] not in CHANNEL_CODE:
            raise ValueError(f"viewer payload: edge channel must be q, k, v or null, not {edge['channel']!r}")
    inputs = {}  # downstream input names the page cannot derive as target + <channel>
    for i, edge in enumerate(edges):
        derived = edge["target"] + (f"<{edge['channel']}>" if edge["channel"] else "")
        if edge.get("input", derived) != derived:
            inputs[str(i)] = edge["input"]
    meta = {key: value for key, value in payload.items() if key not in ("nodes", "edges")}
    return {
        "meta": meta,
        "nodes": {
            "id": [n["id"] for n in nodes],
            "kind": [n["kind"] for n in nodes],
            "layer": [n["layer"] for n in nodes],
            "column": [n.get("column") for n in nodes],
            "score": [_score(n.get("score")) for n in nodes],
            "in": [1 if n.get("in_circuit") else 0 for n in nodes],
            "label": [n.get("label") for n in nodes],
            "feeds": {str(i): [index[h] for h in n["feeds"] if h in index] for i, n in enumerate(nodes) if n.get("feeds")},
        },
        "edges": {
            "s": [index[e["source"]] for e in edges],
            "t": [index[e["target"]] for e in edges],
            "c": [CHANNEL_CODE[e["channel"]] for e in edges],
            "w": [_score(e.get("score")) for e in edges],
            "m": [1 if e.get("in_circuit") else 0 for e in edges],
            "input": inputs,
        },
    }
