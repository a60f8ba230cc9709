"""The viewer payload (``circuitctl.view`` version 1) built from a circuit record.

The record is the schema-2 record that `circuitctl.circuits.record.load_circuit_file` returns
(for our files of either version and for MIB files alike); the page (`circuitctl.viewer.page`)
reads only the payload. Each kind of circuit (``record["space"]["kind"]``) has one small
builder returning its nodes, edges and circuit summary; the shared parts (title, faithfulness
curve, explanation labels) are kind-independent. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from circuitctl.circuits.record import SCHEMA_VERSION
from circuitctl.errors import UsageError
from circuitctl.graph import naming

FORMAT = "circuitctl.view"
VERSION = 1
# Node-ranked spaces can be large (GPT-2 small: 36,864 neurons); the page keeps the circuit's
# units and the strongest others up to this many, which is plenty for a slider.
MAX_NODE_UNITS = 5000
# Likewise for edges: GPT-2 small has 32,491 (about 1 MB embedded); per-position graphs of large
# models can have ten times more, which would pass 5 MB.
MAX_EDGES = 100_000

# what each kind of circuit counts, and whether the page ranks edges or nodes
UNITS = {"edge": "edges", "positional_edge": "edges", "node": "nodes", "positional_node": "nodes", "neuron": "neurons", "feature": "features"}
_NODE_KIND = {"input": "input", "head": "head", "group": "kv_group", "mlp": "mlp", "logits": "logits"}
# feature sites inside a layer, in forward order, as fractional rows between layer L and L + 1
_SITE_ROW = {"attn": 0.0, "mlp": 1 / 3, "resid": 2 / 3}


def payload_from_record(record: dict, faithfulness: dict | None = None, explanation: dict | None = None) -> dict:
    """The viewer payload of a schema-2 circuit record (`load_circuit_file(...).record`), with the
    curve of its faithfulness.json and the roles of its explanation.json when given."""
    kind = record_kind(record)
    nodes, edges, circuit = _BUILDERS[kind](record)
    if explanation:
        _label_roles(nodes, explanation)
    return {
        "format": FORMAT,
        "version": VERSION,
        "title": _title(record, circuit, faithfulness),
        "kind": kind,
        "ranked": "edges" if circuit["unit"] == "edges" else "nodes",
        "n_layers": _n_layers(record),
        "columns": _columns(record, nodes),
        "nodes": nodes,
        "edges": edges,
        "circuit": circuit,
        "explanation": explanation,
        "faithfulness": faithfulness_subset(faithfulness) if faithfulness else None,
    }


def record_kind(record: Any) -> str:
    """The record's ``space.kind`` (edge | node | neuron | positional_edge | positional_node | feature).

    Only schema-2 records: files of other versions and formats are upgraded by `load_circuit_file`."""
    space = record.get("space") if isinstance(record, dict) else None
    if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION or not isinstance(space, dict):
        raise UsageError(f"not a schema-{SCHEMA_VERSION} circuit record (read circuit files with circuitctl.circuits.record.load_circuit_file)")
    if space.get("kind") not in UNITS:
        raise UsageError(f"circuit record: unknown kind of circuit '{space.get('kind')}' (expected one of {', '.join(UNITS)})")
    if not isinstance(record.get("nodes"), dict) or not isinstance(record.get("edges"), dict):
        raise UsageError("circuit record: expected 'nodes' and 'edges' mappings")
    return space["kind"]


def _n_layers(record: dict) -> int:
    # feature circuits upgraded from version 1 carry no graph shape, but their model section does
    value = (record.get("graph") or {}).get("n_layers", (record.get("model") or {}).get("n_layers", 0))
    return int(value or 0)


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


def _parse(parse: Callable, name: str, entry: str | None = None):
    """A name parsed by one of `graph.naming`'s parsers; a malformed name is a UsageError that
    names the record's entry it came from (`entry`, else the name)."""
    try:
        return parse(name)
    except ValueError as exc:
        entry = entry or name
        where = "" if f"'{entry}'" in str(exc) else f"'{entry}': "
        raise UsageError(f"circuit record: {where}{exc}") from exc


def _graph_node(name: str, entry: dict, n_layers: int) -> dict:
    parsed = _parse(naming.parse_node, name)
    layer = {"input": -1, "logits": n_layers}.get(parsed.kind, parsed.layer)
    return _node(name, _NODE_KIND[parsed.kind], layer, parsed.position, entry.get("score"), entry.get("in_graph", False))


def _graph_nodes_and_edges(record: dict) -> tuple[list[dict], list[dict]]:
    """Nodes and edges of a (per-position) head/MLP graph; edge targets are nodes, not inputs."""
    n_layers = _n_layers(record)
    nodes = {name: _graph_node(name, entry, n_layers) for name, entry in _entries(record["nodes"])}
    edges = []
    for name, entry in _entries(record["edges"]):
        source, target_input = _parse(naming.parse_edge, name)
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
    return nodes, _keep_strongest(edges, MAX_EDGES), _summary(record, sum(e["in_circuit"] for e in edges), scored)


def _node_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    nodes, edges = _graph_nodes_and_edges(record)
    scored = sum(1 for n in nodes if n["score"] is not None)
    return nodes, edges, _summary(record, sum(n["in_circuit"] for n in nodes if n["score"] is not None), scored)


def _neuron_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    nodes = []
    for name, entry in _entries(record.get("neurons") or {}):
        layer, _ = _parse(naming.parse_neuron, name)
        nodes.append(_node(name, "neuron", layer, None, entry.get("score"), entry.get("in_graph", False)))
    total = len(nodes)
    nodes = _keep_strongest(nodes, MAX_NODE_UNITS)
    return nodes, [], _summary(record, sum(n["in_circuit"] for n in nodes), total)


def _feature_circuit(record: dict) -> tuple[list[dict], list[dict], dict]:
    n_layers = _n_layers(record)
    nodes = {}
    for name, entry in _entries(record["nodes"]):
        if name == naming.LOGITS:
            nodes[name] = _node(name, "logits", n_layers, None, None, True)
            continue
        node = _parse(naming.parse_feature_node, name)
        site = _parse(naming.parse_site, node.site, name)
        layer = -1 if site.kind == "embed" else site.layer + _SITE_ROW[site.kind]
        label = entry.get("label")
        nodes[name] = _node(name, "error" if node.is_error else "feature", layer, node.position, entry.get("score"),
                            entry.get("in_graph", False), str(label) if label is not None else None)
    edges = []
    for name, entry in _entries(record["edges"]):
        source, target = _parse(naming.split_edge, name)
        for end in (source, target):
            if end not in nodes:
                raise UsageError(f"circuit record: edge '{name}' names the unknown node '{end}'")
        edges.append({"source": source, "target": target, "input": target, "channel": None,
                      "score": _number(entry.get("score")), "in_circuit": bool(entry.get("in_graph"))})
    scored = [n for n in nodes.values() if n["score"] is not None]
    return list(nodes.values()), edges, _summary(record, sum(n["in_circuit"] for n in scored), len(scored))


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
            raise UsageError(f"circuit record: entry '{name}' is not an object")
        yield str(name), entry


def _keep_strongest(units: list[dict], limit: int) -> list[dict]:
    """The circuit's units and the strongest others, at most `limit` in all, in their order."""
    if len(units) <= limit:
        return units
    ranked = sorted(range(len(units)), key=lambda i: (not units[i]["in_circuit"], -abs(units[i]["score"] or 0.0)))
    return [units[i] for i in sorted(ranked[:limit])]


def _summary(record: dict, n_in_circuit: int, n_counted: int) -> dict:
    """What the page says of the recorded circuit. `n_total` is the space's size where the run
    recorded it (a feature circuit saves only its scored features), else the units counted here."""
    unit = UNITS[record["space"]["kind"]]
    results = record.get("results") or {}
    n_total = results.get(f"n_{unit}_total")
    selection = record.get("selection") or {}
    # `prune` and `absolute` (optional) start the page's tree-shake and ranking toggles as the run chose them
    return {"unit": unit, "n_in_circuit": int(n_in_circuit), "n_total": n_total if isinstance(n_total, int) else int(n_counted),
            "selection_rule": _selection_rule(record, unit),
            "prune": bool(selection.get("prune", False)) and unit == "edges", "absolute": bool(selection.get("absolute", True))}


def _selection_rule(record: dict, unit: str) -> str:
    """The rule that chose the circuit: as the run recorded it (schema 2), else from its selection."""
    space, results = record["space"], record.get("results") or {}
    chosen_by = results.get("chosen_by")
    if isinstance(chosen_by, str) and chosen_by:
        rule = chosen_by
    elif space["kind"] == "feature":
        rule = f"features with |effect| > {space.get('node_threshold')}"
    else:
        selection = record.get("selection") or {}
        by = "|score|" if selection.get("absolute", True) else "score"
        if selection.get("threshold") is not None:
            rule = f"{by} >= {selection['threshold']}"
        elif selection.get("fraction") is not None:
            rule = f"top {selection['fraction']:.3g} of {unit} by {by}"
        elif selection.get("top_n") is not None:
            rule = f"top {selection['top_n']} {unit} by {by}"
        else:
            rule = f"the method's own circuit ({(record.get('method') or {}).get('name', '?')})"
        rule += ", tree-shaken" if selection.get("prune") and unit == "edges" else ""
    if space["kind"] == "feature":  # edges join circuit features and pass their own threshold
        rule += f"; edges with |effect| > {space.get('edge_threshold')}"
    return rule


def _format_f(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else "undefined"


def _title(record: dict, circuit: dict, faithfulness: dict | None) -> str:
    task = (record.get("task") or {}).get("name") or "?"
    method = (record.get("method") or {}).get("name") or "?"
    results = record.get("results") or {}
    point = results.get("sweep")  # a sweep point's parameters, e.g. {"tau": 0.01}
    if isinstance(point, dict) and point:
        method = f"{method} " + ", ".join(f"{key}={value}" for key, value in point.items())
    parts = [str(task), str(method), f"{circuit['n_in_circuit']} {circuit['unit']}"]
    source = faithfulness if faithfulness and "faithfulness" in faithfulness else results
    if "faithfulness" in source:  # None: undefined (the ablation changes nothing)
        parts.append(f"f = {_format_f(source['faithfulness'])}")
    return " | ".join(parts)


def _columns(record: dict, nodes: list[dict]) -> list[str] | None:
    """Ordered position names for per-position kinds; None when no node has a position."""
    positions = record["space"].get("positions") or {}
    columns = list(dict.fromkeys(str(name) for name in positions.get("names") or []))
    for node in nodes:
        if node["column"] is not None and node["column"] not in columns:
            columns.append(node["column"])
    return columns or None


def faithfulness_subset(report: dict) -> dict:
    """What the page draws of faithfulness.json: f, completeness, CPR/CMD (None where they do not
    apply) and the curve as (units kept, f) points. A report without `curve_sizes` (written
    before schema 2) gives its numbers but no curve."""
    subset = {key: _number(report.get(key)) if isinstance(report.get(key), (int, float)) else None
              for key in ("faithfulness", "completeness", "cpr", "cmd")}
    subset["undefined"] = report.get("faithfulness_undefined") if isinstance(report.get("faithfulness_undefined"), str) else None
    sizes = report.get("curve_sizes")
    if isinstance(sizes, list) and sizes:
        curves = {key: _curve(report.get(key), len(sizes)) for key in ("curve_signed", "curve_absolute")}
        percentages = report.get("percentages") if isinstance(report.get("percentages"), list) else None
        subset.update(x=[int(n) for n in sizes], percentages=percentages, **curves)
    else:
        subset.update(x=None, percentages=None, curve_signed=None, curve_absolute=None)
    return subset


def _curve(values, n: int) -> list[float | None] | None:
    """A curve's f values (None: undefined at that point), or None when absent or malformed."""
    if not isinstance(values, list) or len(values) != n:
        return None
    return [_number(v) if isinstance(v, (int, float)) else None for v in values]


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
