"""The viewer payload (``circuitctl.view`` version 1) built from a circuit file's record.

The page (`circuitctl.viewer.page`) reads only the payload; this module is the one place that
knows the circuit-file formats. Each kind of circuit has one small builder returning its nodes,
edges and circuit summary; the shared parts (title, faithfulness curve, explanation labels)
are kind-independent. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from circuitctl.errors import UsageError
from circuitctl.graph import naming

FORMAT = "circuitctl.view"
VERSION = 1
CIRCUIT_FORMAT = "circuitctl.circuit"
FEATURE_FORMAT = "circuitctl.feature_circuit"
READS_SCHEMA = 1
# Node-ranked spaces can be large (GPT-2 small: 36,864 neurons); the page keeps the circuit's
# units and the strongest others up to this many, which is plenty for a slider.
MAX_NODE_UNITS = 5000
# Likewise for edges: GPT-2 small has 32,491 (about 1 MB embedded); per-position graphs of large
# models can have ten times more, which would pass 5 MB.
MAX_EDGES = 100_000

_NODE_KIND = {"input": "input", "head": "head", "group": "kv_group", "mlp": "mlp", "logits": "logits"}
# feature sites inside a layer, in forward order, as fractional rows between layer L and L + 1
_SITE_ROW = {"attn": 0.0, "mlp": 1 / 3, "resid": 2 / 3}


def payload_from_record(record: dict, faithfulness: dict | None = None, explanation: dict | None = None) -> dict:
    """The viewer payload of a circuit.json record (every kind circuitctl writes, schema 1)."""
    kind = record_kind(record)
    nodes, edges, circuit = _BUILDERS[kind](record)
    if explanation:
        _label_roles(nodes, explanation)
    n_layers = int((record.get("model") or record.get("graph") or {}).get("n_layers", 0))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "title": _title(record, circuit, faithfulness),
        "kind": kind,
        "ranked": "edges" if circuit["unit"] == "edges" else "nodes",
        "n_layers": n_layers,
        "columns": _columns(record, nodes),
        "nodes": nodes,
        "edges": edges,
        "circuit": circuit,
        "explanation": explanation,
        "faithfulness": faithfulness_subset(faithfulness, circuit["n_total"]) if faithfulness else None,
    }
    return payload


def record_kind(record: Any) -> str:
    """edge | node | neuron | positional_edge | positional_node | feature; UsageError otherwise."""
    if not isinstance(record, dict) or not isinstance(record.get("nodes"), dict) or not isinstance(record.get("edges"), dict):
        raise UsageError("not a circuit file: expected a circuitctl circuit.json with 'nodes' and 'edges'")
    version = record.get("schema_version")
    if isinstance(version, int) and version > READS_SCHEMA:
        raise UsageError(f"circuit file schema version {version} is newer than the viewer reads ({READS_SCHEMA})")
    if record.get("format") == FEATURE_FORMAT:
        return "feature"
    if record.get("format") != CIRCUIT_FORMAT:
        raise UsageError(f"not a circuitctl circuit file (format '{record.get('format')}'; expected '{CIRCUIT_FORMAT}' or '{FEATURE_FORMAT}')")
    granularity = record.get("granularity", "edge")
    if granularity == "neuron":
        return "neuron"
    if record.get("positions"):
        return "positional_node" if granularity == "node" else "positional_edge"
    return "node" if granularity == "node" else "edge"


# ---------------------------------------------------------------------------------------------
# kind-specific builders: record -> (nodes, edges, circuit summary)
# ---------------------------------------------------------------------------------------------
def _node(node_id: str, kind: str, layer: float, column: str | None, score, in_circuit: bool, label: str | None = None) -> dict:
    return {"id": node_id, "kind": kind, "layer": layer, "column": column, "score": _number(score), "in_circuit": bool(in_circuit), "label": label}


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _graph_node(name: str, entry: dict, n_layers: int) -> dict:
    parsed = naming.parse_node(name)
    layer = {"input": -1, "logits": n_layers}.get(parsed.kind, parsed.layer)
    return _node(name, _NODE_KIND[parsed.kind], layer, parsed.position, entry.get("score"), entry.get("in_graph", False))


def _graph_nodes_and_edges(record: dict) -> tuple[list[dict], list[dict]]:
    """Nodes and edges of a (per-position) head/MLP graph; edge targets are nodes, not inputs."""
    n_layers = int(record["graph"]["n_layers"])
    nodes = {name: _graph_node(name, entry, n_layers) for name, entry in _entries(record["nodes"])}
    edges = []
    for name, entry in _entries(record["edges"]):
        try:
            source, target_input = naming.parse_edge(name)
        except ValueError as exc:
            raise UsageError(f"circuit file: {exc}") from exc
        down = naming.parse_node(target_input)
        target = down.base + (f"@{down.position}" if down.position is not None else "")
        if target not in nodes:  # KV groups (grouped-query attention) are not listed among the nodes
            nodes[target] = _graph_node(target, {"in_graph": False}, n_layers)
        if entry.get("in_graph"):
            nodes[target]["in_circuit"] = True
        edges.append({"source": source, "target": target, "input": target_input, "channel": down.channel,
                      "score": _number(entry.get("score")), "in_circuit": bool(entry.get("in_graph"))})
    _link_kv_groups(nodes)
    return list(nodes.values()), edges


def _link_kv_groups(nodes: dict[str, dict]) -> None:
    """A KV group's k/v input is shared by consecutive heads: record them (`feeds`) for tree-shaking."""
    groups = [n for n in nodes.values() if n["kind"] == "kv_group"]
    for group in groups:
        parsed = naming.parse_node(group["id"])
        heads = [n for n in nodes.values() if n["kind"] == "head" and n["layer"] == group["layer"] and n["column"] == group["column"]]
        n_groups = sum(1 for g in groups if g["layer"] == group["layer"] and g["column"] == group["column"])
        per_group = max(1, len(heads) // max(1, n_groups))
        group["feeds"] = [h["id"] for h in heads if naming.parse_node(h["id"]).index // per_group == parsed.index]


def _edge_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    nodes, edges = _graph_nodes_and_edges(record)
    node_scores = (record.get("results") or {}).get("node_scores")  # CD-T reports node relevances too
    if isinstance(node_scores, dict):
        for node in nodes:
            if node["score"] is None and node["id"] in node_scores:
                node["score"] = _number(node_scores[node["id"]])
    scored = sum(1 for e in edges if e["score"] is not None)
    return nodes, _keep_strongest(edges, MAX_EDGES), _summary(record, "edges", sum(e["in_circuit"] for e in edges), scored)


def _node_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    nodes, edges = _graph_nodes_and_edges(record)
    scored = sum(1 for n in nodes if n["score"] is not None)
    return nodes, edges, _summary(record, "nodes", sum(n["in_circuit"] for n in nodes if n["score"] is not None), scored)


def _neuron_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    nodes = []
    for name, entry in _entries(record.get("neurons") or {}):
        try:
            layer, _ = naming.parse_neuron(name)
        except ValueError as exc:
            raise UsageError(f"circuit file: {exc}") from exc
        nodes.append(_node(name, "neuron", layer, None, entry.get("score"), entry.get("in_graph", False)))
    total = len(nodes)
    nodes = _keep_strongest(nodes, MAX_NODE_UNITS)
    return nodes, [], _summary(record, "nodes", sum(n["in_circuit"] for n in nodes), total)


def _feature_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    n_layers = int((record.get("model") or {}).get("n_layers", 0))
    nodes = {}
    for name, entry in _entries(record["nodes"]):
        if name == naming.LOGITS:
            nodes[name] = _node(name, "logits", n_layers, None, None, True)
            continue
        try:
            node = naming.parse_feature_node(name)
            site = naming.parse_site(node.site)
        except ValueError as exc:
            raise UsageError(f"circuit file: {exc}") from exc
        layer = -1 if site.kind == "embed" else site.layer + _SITE_ROW[site.kind]
        label = entry.get("label")
        nodes[name] = _node(name, "error" if node.is_error else "feature", layer, node.position, entry.get("score"),
                            entry.get("in_graph", False), str(label) if label is not None else None)
    edges = []
    for name, entry in _entries(record["edges"]):
        try:
            source, target = naming.split_edge(name)
        except ValueError as exc:
            raise UsageError(f"circuit file: {exc}") from exc
        for end in (source, target):
            if end not in nodes:
                raise UsageError(f"circuit file: edge '{name}' names the unknown node '{end}'")
        edges.append({"source": source, "target": target, "input": target, "channel": None,
                      "score": _number(entry.get("score")), "in_circuit": bool(entry.get("in_graph"))})
    scored = [n for n in nodes.values() if n["score"] is not None]
    return list(nodes.values()), edges, _summary(record, "nodes", sum(n["in_circuit"] for n in scored), len(scored))


_BUILDERS: dict[str, Callable[[dict], tuple[list[dict], list[dict], dict]]] = {
    "edge": _edge_circuit,
    "positional_edge": _edge_circuit,
    "node": _node_circuit,
    "positional_node": _node_circuit,
    "neuron": _neuron_circuit,
    "feature": _feature_circuit,
}


# ---------------------------------------------------------------------------------------------
# shared parts
# ---------------------------------------------------------------------------------------------
def _entries(mapping: dict):
    for name, entry in mapping.items():
        if not isinstance(entry, dict):
            raise UsageError(f"circuit file: entry '{name}' is not an object")
        yield str(name), entry


def _keep_strongest(units: list[dict], limit: int) -> list[dict]:
    """The circuit's units and the strongest others, at most `limit` in all, in their order."""
    if len(units) <= limit:
        return units
    ranked = sorted(range(len(units)), key=lambda i: (not units[i]["in_circuit"], -abs(units[i]["score"] or 0.0)))
    return [units[i] for i in sorted(ranked[:limit])]


def _summary(record: dict, unit: str, n_in_circuit: int, n_total: int) -> dict:
    selection = record.get("selection") or {}
    # `prune` and `absolute` (optional) start the page's tree-shake and ranking toggles as the run chose them
    return {"unit": unit, "n_in_circuit": int(n_in_circuit), "n_total": int(n_total), "selection_rule": _selection_rule(record, unit),
            "prune": bool(selection.get("prune", False)) and unit == "edges", "absolute": bool(selection.get("absolute", True))}


def _selection_rule(record: dict, unit: str) -> str:
    graph = record.get("feature_graph")
    if isinstance(graph, dict):
        return f"nodes with |effect| >= {graph.get('node_threshold')}, edges with |effect| >= {graph.get('edge_threshold')}"
    selection = record.get("selection") or {}
    by = "|score|" if selection.get("absolute", True) else "score"
    if selection.get("threshold") is not None:
        rule = f"{by} >= {selection['threshold']}"
    elif selection.get("fraction") is not None:
        rule = f"top {selection['fraction']:.3g} of units by {by}"
    elif selection.get("top_n") is not None:
        rule = f"top_n {selection['top_n']} by {by}"
    else:
        rule = f"the method's own circuit ({(record.get('method') or {}).get('name', '?')})"
    return rule + (", tree-shaken" if selection.get("prune") and unit == "edges" else "")


def _title(record: dict, circuit: dict, faithfulness: dict | None) -> str:
    task = (record.get("task") or {}).get("name") or "?"
    method = (record.get("method") or {}).get("name") or "?"
    value = (faithfulness or {}).get("faithfulness", (record.get("results") or {}).get("faithfulness"))
    parts = [str(task), str(method), f"{circuit['n_in_circuit']} {circuit['unit']}"]
    if isinstance(value, (int, float)) and math.isfinite(value):
        parts.append(f"f = {value:.3g}")
    return " | ".join(parts)


def _columns(record: dict, nodes: list[dict]) -> list[str] | None:
    """Ordered position names for per-position kinds; None when no node has a position."""
    named = (record.get("positions") or {}).get("names") or (record.get("feature_graph") or {}).get("positions") or []
    columns = list(dict.fromkeys(str(name) for name in named))
    for node in nodes:
        if node["column"] is not None and node["column"] not in columns:
            columns.append(node["column"])
    return columns or None


def n_kept(percentage: float, n_total: int) -> int:
    """Units kept at a curve percentage: the rounding of circuitctl.metrics.faithfulness."""
    return min(n_total, max(1, math.ceil(percentage / 100 * n_total)))


def faithfulness_subset(report: dict, n_total: int) -> dict:
    """The curve of faithfulness.json as (units kept, f) points, whichever evaluation wrote it."""
    subset = {key: _number(report.get(key)) if isinstance(report.get(key), (int, float)) else None
              for key in ("faithfulness", "completeness", "cpr", "cmd")}
    if isinstance(report.get("percentages"), list):  # edge, node, neuron and per-position circuits
        total = int(report.get("n_edges_total") or n_total)
        subset.update(x=[n_kept(p, total) for p in report["percentages"]], percentages=list(report["percentages"]),
                      curve_signed=report.get("curve_signed"), curve_absolute=report.get("curve_absolute"))
    elif isinstance(report.get("curve_n_nodes"), list):  # feature circuits: nodes kept by |effect|
        subset.update(x=list(report["curve_n_nodes"]), percentages=None, curve_signed=None,
                      curve_absolute=report.get("curve_faithfulness"))
    else:
        subset.update(x=None, percentages=None, curve_signed=None, curve_absolute=None)
    return subset


def _label_roles(nodes: list[dict], explanation: dict) -> None:
    """Label nodes with their explained roles (per-position nodes share their head's)."""
    explained = explanation.get("nodes") if isinstance(explanation, dict) else None
    if not isinstance(explained, dict):
        return
    for node in nodes:
        entry = explained.get(node["id"]) or explained.get(node["id"].split("@")[0])
        roles = entry.get("roles") if isinstance(entry, dict) else None
        if node["label"] is None and isinstance(roles, list) and roles:
            node["label"] = ", ".join(str(r.get("role", r)) if isinstance(r, dict) else str(r) for r in roles)
