"""Feature-circuit files: ``circuit.json`` (format ``circuitctl.feature_circuit``) and Graphviz.

The JSON has the provenance fields of our edge-circuit format (model, task, method, config and
its hash, library versions, seed, timings, results) and:

    "feature_graph": {"sites", "sae_sources", "aggregation", "positions", "node_threshold", "edge_threshold"}
    "nodes": {"resid0/f12": {"score", "in_graph", "label"}, "mlp1/err": {...}, "logits": {...}}
    "edges": {"resid0/f12->mlp1/f3": {"score", "in_graph"}, "resid1/f7->logits": {...}}

`nodes` holds every circuit node and the strongest others (for threshold curves); `edges` the
edges between circuit nodes. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from circuitctl.errors import UsageError
from circuitctl.io.escape import dot_string
from circuitctl.io.files import write_json
from circuitctl.sae.circuit import FeatureCircuit
from circuitctl.sae.sites import LOGITS, parse_node, parse_site, split_edge

FORMAT = "circuitctl.feature_circuit"
SCHEMA_VERSION = 1


def to_record(circuit: FeatureCircuit, provenance: dict[str, Any]) -> dict[str, Any]:
    in_graph = set(circuit.circuit_nodes)
    nodes: dict[str, Any] = {}
    for name, score in circuit.nodes.items():
        entry: dict[str, Any] = {"score": score, "in_graph": name in in_graph}
        if name in circuit.labels:
            entry["label"] = circuit.labels[name]
        nodes[name] = entry
    nodes[LOGITS] = {"score": None, "in_graph": True}
    kept = set(circuit.circuit_edges)
    edges = {name: {"score": score, "in_graph": name in kept} for name, score in circuit.edges.items()}
    graph = {
        "sites": circuit.sites,
        "sae_sources": circuit.sae_sources,
        "aggregation": circuit.aggregation,
        "positions": circuit.positions,
        "node_threshold": circuit.node_threshold,
        "edge_threshold": circuit.edge_threshold,
        "stats": circuit.stats,
    }
    return {"schema_version": SCHEMA_VERSION, "format": FORMAT, **provenance, "feature_graph": graph, "nodes": nodes, "edges": edges}


def write_feature_circuit(path: Path, circuit: FeatureCircuit, provenance: dict[str, Any]) -> None:
    write_json(path, to_record(circuit, provenance))


def _circuit_file(path: Path) -> Path:
    path = Path(path)
    return path / "circuit.json" if path.is_dir() else path


def is_feature_circuit(path: Path) -> bool:
    """Whether `path` (a circuit file or run directory) holds a feature circuit."""
    file = _circuit_file(path)
    if not file.is_file():
        return False
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and record.get("format") == FORMAT


def read_feature_circuit(path: Path) -> tuple[FeatureCircuit, dict[str, Any]]:
    file = _circuit_file(path)
    if not file.is_file():
        raise UsageError(f"circuit file '{file}' does not exist")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UsageError(f"{file}: not a feature-circuit file (format '{FORMAT}')")
    if record.get("schema_version", 0) > SCHEMA_VERSION:
        raise UsageError(f"{file}: schema version {record['schema_version']} is newer than this circuitctl reads ({SCHEMA_VERSION})")
    graph = record.get("feature_graph")
    if not isinstance(graph, dict) or not isinstance(record.get("nodes"), dict) or not isinstance(record.get("edges"), dict):
        raise UsageError(f"{file}: a feature circuit needs 'feature_graph', 'nodes' and 'edges'")
    try:
        for site in graph["sites"]:
            parse_site(site)
        nodes = {n: e.get("score") for n, e in record["nodes"].items() if n != LOGITS}
        for name in nodes:
            parse_node(name)
        for name in record["edges"]:
            split_edge(name)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UsageError(f"{file}: malformed feature circuit: {exc}") from exc
    circuit = FeatureCircuit(
        sites=list(graph["sites"]),
        sae_sources=dict(graph.get("sae_sources") or {}),
        aggregation=graph.get("aggregation", "sum"),
        positions=graph.get("positions"),
        node_threshold=float(graph.get("node_threshold", 0.0)),
        edge_threshold=float(graph.get("edge_threshold", 0.0)),
        nodes={n: float(s or 0.0) for n, s in nodes.items()},
        circuit_nodes=[n for n, e in record["nodes"].items() if n != LOGITS and e.get("in_graph")],
        edges={n: float(e.get("score") or 0.0) for n, e in record["edges"].items()},
        circuit_edges=[n for n, e in record["edges"].items() if e.get("in_graph")],
        labels={n: e["label"] for n, e in record["nodes"].items() if isinstance(e, dict) and "label" in e},
        stats=dict(graph.get("stats") or {}),
    )
    return circuit, record


# ----------------------------------------------------------------------------------------
# Graphviz
# ----------------------------------------------------------------------------------------
POSITIVE, NEGATIVE = "#2c5d8f", "#c0392b"
_FILL = {"embed": "#dddddd", "attn": "#d9ead3", "mlp": "#fde9c9", "resid": "#cfe2f3"}


def _quote(text: str) -> str:
    return dot_string(text)


def _multiline(lines: list[str]) -> str:
    """A quoted Graphviz label with one line per entry."""
    return dot_string("\n".join(lines))


def to_dot(circuit: FeatureCircuit, title: str = "") -> str:
    """Nodes in rows by site (embed at the bottom, logits on top), edges by sign and |score|."""
    edges = [(split_edge(name), circuit.edges[name]) for name in circuit.circuit_edges]
    shown = set(circuit.circuit_nodes) | {LOGITS}
    max_abs = max((abs(s) for _, s in edges), default=1.0) or 1.0
    lines = [
        "digraph feature_circuit {",
        "  rankdir=BT; splines=true; nodesep=0.2; ranksep=0.5;",
        f"  label={_quote(title)}; labelloc=t; fontname=Helvetica;",
        "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
    ]
    by_site: dict[str, list[str]] = {}
    for name in circuit.circuit_nodes:
        by_site.setdefault(parse_node(name).site, []).append(name)
    for site in circuit.sites:
        members = by_site.get(site, [])
        if not members:
            continue
        kind = parse_site(site).kind
        rows = []
        for name in members:
            node = parse_node(name)
            text = [name, f"{circuit.nodes.get(name, 0.0):+.3g}"]
            if name in circuit.labels:
                text.append(circuit.labels[name][:40])
            shape = ", shape=octagon, fillcolor=\"#eeeeee\"" if node.is_error else ""
            rows.append(f"{_quote(name)} [label={_multiline(text)}{shape}]")
        lines.append(f"  {{ rank=same; node [fillcolor={_quote(_FILL[kind])}]; " + "; ".join(rows) + "; }")
    lines.append(f"  {{ rank=max; {_quote(LOGITS)} [fillcolor=\"#dddddd\"]; }}")
    for (up, down), score in edges:
        if up not in shown or down not in shown:
            continue
        colour = POSITIVE if score >= 0 else NEGATIVE
        width = 0.5 + 4.5 * abs(score) / max_abs
        style = "solid" if score >= 0 else "dashed"
        lines.append(
            f"  {_quote(up)} -> {_quote(down)} [color={_quote(colour)}, penwidth={width:.2f}, style={style}, "
            f"tooltip={_quote(f'{up}->{down}: {score:.4g}')}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
