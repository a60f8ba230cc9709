"""Graphviz drawing of a circuit: nodes laid out by layer, edges coloured by channel and sign,
width by |score|. Renders to SVG with Graphviz's `dot` when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch

from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.io.escape import dot_string
from circuitctl.io.files import write_atomic

CHANNEL_COLOURS = {"q": "#7b3294", "k": "#1a9641", "v": "#e66101"}  # purple, green, orange
POSITIVE, NEGATIVE = "#2c5d8f", "#c0392b"


def quote(text: str) -> str:
    """A Graphviz double-quoted string (an ID, a label, a tooltip): `circuitctl.io.escape.dot_string`
    escapes quotes, backslashes, '&', line breaks and control characters."""
    return dot_string(str(text))


_quote = quote


def quote_lines(lines: list[str]) -> str:
    """A Graphviz double-quoted label with one line per entry."""
    return dot_string("\n".join(str(line) for line in lines))


def _layer_of(name: str, n_layers: int) -> int:
    node = naming.parse_node(name)
    if node.kind == "input":
        return -1
    if node.kind == "logits":
        return n_layers
    return node.layer  # type: ignore[return-value]


def to_dot(graph: Graph, scores: torch.Tensor, membership: torch.Tensor, title: str = "") -> str:
    edges = membership.nonzero().tolist()
    max_abs = max((abs(float(scores[u, v])) for u, v in edges), default=1.0) or 1.0
    nodes: dict[str, None] = {}
    lines = [
        "digraph circuit {",
        "  rankdir=BT; splines=true; nodesep=0.25; ranksep=0.6;",
        f"  label={_quote(title)}; labelloc=t; fontname=Helvetica;",
        "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=11];",
    ]
    body = []
    for u, v in edges:
        up, down_input = graph.upstream[u], graph.downstream[v]
        down = graph.node_of_input(v)
        nodes[up] = None
        nodes[down] = None
        score = float(scores[u, v])
        channel = naming.parse_node(down_input).channel
        colour = CHANNEL_COLOURS[channel] if channel else (POSITIVE if score >= 0 else NEGATIVE)
        style = "dashed" if score < 0 else "solid"
        width = 0.5 + 4.5 * abs(score) / max_abs
        label = f", label={_quote(channel)}, fontcolor={_quote(colour)}" if channel else ""
        body.append(
            f"  {_quote(up)} -> {_quote(down)} [color={_quote(colour)}, penwidth={width:.2f}, style={style}"
            f", tooltip={_quote(f'{up}->{down_input}: {score:.4g}')}{label}];"
        )
    # grouped-query attention: a KV group's shared k/v input feeds those of its heads in the circuit
    for group, heads in graph.kv_group_members.items():
        if group in nodes:
            body += [f"  {_quote(group)} -> {_quote(h)} [color=\"#888888\", style=dotted, arrowsize=0.5];" for h in heads if h in nodes]
    by_layer: dict[int, list[str]] = {}
    for name in nodes:
        by_layer.setdefault(_layer_of(name, graph.spec.n_layers), []).append(name)
    for layer in sorted(by_layer):
        members = " ".join(_quote(n) for n in sorted(by_layer[layer]))
        fill = {-1: "#dddddd", graph.spec.n_layers: "#dddddd"}.get(layer, "#cfe2f3")
        lines.append(f"  {{ rank=same; node [fillcolor={_quote(fill)}]; {members} }}")
    for name in nodes:
        kind = naming.parse_node(name).kind
        if kind == "mlp":
            lines.append(f"  {_quote(name)} [fillcolor=\"#fde9c9\", shape=box];")
        elif kind == "group":
            lines.append(f"  {_quote(name)} [fillcolor=\"#e8f4e1\", shape=ellipse, label={_quote(name + ' (KV)')}];")
    lines += body
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_drawing(dot_path: Path, dot_source: str) -> tuple[Path | None, str]:
    """Write the .dot file and, if `dot` is installed, an .svg beside it.

    Returns (svg path or None, a one-line note)."""
    write_atomic(dot_path, dot_source)
    executable = shutil.which("dot")
    svg_path = dot_path.with_suffix(".svg")
    if executable is None:
        return None, f"Graphviz 'dot' is not installed: wrote {dot_path.name} only (apt-get install graphviz, then dot -Tsvg {dot_path.name})"
    try:  # the source on stdin: inside `staged_writes` the .dot file is not in place yet
        result = subprocess.run([executable, "-Tsvg"], input=dot_source.encode("utf-8"), capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:  # a drawing is never worth failing a finished run for
        return None, f"dot took over 120 s; wrote {dot_path.name} only (render it later with dot -Tsvg {dot_path.name})"
    if result.returncode != 0:
        return None, f"dot failed ({result.stderr.decode(errors='replace').strip()[:200]}); wrote {dot_path.name} only"
    write_atomic(svg_path, result.stdout)
    return svg_path, f"drew {svg_path.name}"
