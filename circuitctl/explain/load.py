"""Reading a run directory for an explanation: the one place that knows the circuit-file format.

`load_run(run_dir)` returns the run's config and the circuit's nodes and edges, whatever kind
of circuit the run holds (edge, node, neuron, per-position edge or node, SAE feature circuit;
schema version 1). When the circuit file format changes, only this module changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from circuitctl.config.schema import RunConfig
from circuitctl.errors import UsageError

CIRCUIT_FORMAT = "circuitctl.circuit"
FEATURE_FORMAT = "circuitctl.feature_circuit"
READABLE_SCHEMA = 1
_NEURON = re.compile(r"^m(?P<layer>\d+)\.n(?P<index>\d+)$")


@dataclass(frozen=True)
class CircuitNode:
    name: str  # as in the circuit file: "a1.h0", "a1.h0@end", "m0", "resid0/f12"
    component: str  # the model part: "a1.h0", "m0"; for features the node name without position
    kind: str  # "head" | "mlp" | "feature"
    position: str | None = None  # per-position circuits
    score: float | None = None
    label: str | None = None  # features: top-activating tokens
    layer: int | None = None
    index: int | None = None  # head index / feature index


@dataclass(frozen=True)
class LoadedRun:
    run_dir: Path
    config: RunConfig
    config_dir: Path
    kind: str  # "edge" | "node" | "neuron" | "positional_edge" | "positional_node" | "feature"
    nodes: dict[str, CircuitNode]  # the circuit's heads, MLPs or features (not input / logits)
    edges: dict[str, float]  # the circuit's edges and their scores
    title: str
    positions: list[str] = field(default_factory=list)  # position groups of per-position circuits
    answer_groups: list[str] = field(default_factory=list)
    neurons: dict[str, float] = field(default_factory=dict)  # neuron circuits: m{L}.n{i} -> score
    record_info: dict = field(default_factory=dict)  # model, task, method, config_hash, results


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a text file") from exc
    if not isinstance(record, dict):
        raise UsageError(f"{path}: not a circuit file")
    return record


def _config_path(run_dir: Path) -> Path:
    """config.yaml of the run; a sweep's circuits (RUN_DIR/tau-0.01/) use their parent's."""
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file() and (candidate.parent == run_dir or (run_dir.parent / "sweep.json").is_file()):
            return candidate
    raise UsageError(f"'{run_dir}' has no config.yaml (not a run directory written by circuitctl discover)")


def _check_readable(path: Path, record: dict) -> str:
    fmt = record.get("format")
    if fmt not in (CIRCUIT_FORMAT, FEATURE_FORMAT):
        raise UsageError(f"{path}: not a circuitctl circuit file (format '{fmt}'); explain reads the circuit.json that discover writes")
    version = record.get("schema_version", 0)
    if not isinstance(version, int) or version > READABLE_SCHEMA:
        raise UsageError(f"{path}: schema version {version} is newer than explain reads ({READABLE_SCHEMA})")
    if not isinstance(record.get("nodes"), dict) or not isinstance(record.get("edges"), dict):
        raise UsageError(f"{path}: a circuit file needs 'nodes' and 'edges' mappings")
    return fmt


def _head_graph_node(name: str, entry: dict) -> CircuitNode | None:
    from circuitctl.graph import naming

    try:
        node = naming.parse_node(name)
    except ValueError as exc:
        raise UsageError(f"circuit node '{name}': {exc}") from exc
    if node.kind not in ("head", "mlp"):
        return None  # input, logits, KV groups of grouped-query attention
    score = entry.get("score")
    return CircuitNode(
        name=name,
        component=node.base,
        kind=node.kind,
        position=node.position,
        score=float(score) if isinstance(score, (int, float)) else None,
        layer=node.layer,
        index=node.index,
    )


def _in_graph(mapping: dict) -> dict[str, dict]:
    return {name: entry for name, entry in mapping.items() if isinstance(entry, dict) and entry.get("in_graph")}


def _head_graph(record: dict) -> tuple[str, dict[str, CircuitNode], dict[str, float], dict[str, float]]:
    granularity = record.get("granularity", "edge")
    positional = bool(record.get("positions"))
    kind = {"edge": "edge", "node": "node", "neuron": "neuron"}.get(granularity)
    if kind is None:
        raise UsageError(f"circuit granularity '{granularity}' is not one explain knows (edge, node, neuron)")
    if positional:
        kind = f"positional_{kind}"
    nodes: dict[str, CircuitNode] = {}
    neurons: dict[str, float] = {}
    if granularity == "neuron":
        for name, entry in _in_graph(record.get("neurons") or {}).items():
            match = _NEURON.match(name)
            if not match:
                raise UsageError(f"circuit neuron '{name}' is malformed (expected m<layer>.n<index>)")
            layer = int(match["layer"])
            neurons[name] = float(entry.get("score") or 0.0)
            mlp = f"m{layer}"
            nodes.setdefault(mlp, CircuitNode(mlp, mlp, "mlp", layer=layer))
    else:
        for name, entry in _in_graph(record["nodes"]).items():
            node = _head_graph_node(name, entry)
            if node is not None:
                nodes[name] = node
    node_scores = {name: entry.get("score") for name, entry in record["nodes"].items() if isinstance(entry, dict)}
    edges = {}
    for name, entry in _in_graph(record["edges"]).items():
        score = entry.get("score")
        if score is None:  # node circuits: an edge carries its sender's score (as circuit.dot draws it)
            score = node_scores.get(name.split("->")[0])
        edges[name] = float(score) if isinstance(score, (int, float)) else 0.0
    return kind, nodes, edges, neurons


def _feature_graph(record: dict) -> tuple[dict[str, CircuitNode], dict[str, float]]:
    from circuitctl.sae.sites import LOGITS, parse_node, parse_site

    nodes = {}
    for name, entry in _in_graph(record["nodes"]).items():
        if name == LOGITS:
            continue
        try:
            node = parse_node(name)
        except ValueError as exc:
            raise UsageError(f"feature-circuit node '{name}': {exc}") from exc
        if node.is_error:
            continue  # an SAE's error term: not a feature
        score = entry.get("score")
        base = name.split("@")[0]
        nodes[name] = CircuitNode(
            name=name,
            component=base,
            kind="feature",
            position=node.position,
            score=float(score) if isinstance(score, (int, float)) else None,
            label=entry.get("label"),
            layer=parse_site(node.site).layer,
            index=node.feature,
        )
    edges = {name: float(entry.get("score") or 0.0) for name, entry in _in_graph(record["edges"]).items()}
    return nodes, edges


def _title(record: dict, kind: str, n_nodes: int) -> str:
    task = (record.get("task") or {}).get("name", "task")
    method = (record.get("method") or {}).get("name", "method")
    faithfulness = (record.get("results") or {}).get("faithfulness")
    f = f" | f = {faithfulness:.3f}" if isinstance(faithfulness, (int, float)) else ""
    return f"{task} | {method} | {kind} circuit | {n_nodes} nodes explained{f}"


def load_run(run_dir: Path) -> LoadedRun:
    """The run's config and its circuit's nodes and edges (see `LoadedRun`)."""
    from circuitctl.config.load import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' does not exist" if not run_dir.exists() else f"'{run_dir}' is not a directory")
    circuit_path = run_dir / "circuit.json"
    if not circuit_path.is_file():
        if (run_dir / "sweep.json").is_file():
            subdirs = sorted(p.name for p in run_dir.iterdir() if (p / "circuit.json").is_file())
            raise UsageError(f"'{run_dir}' holds a sweep; explain one of its circuits: {', '.join(str(run_dir / s) for s in subdirs)}")
        raise UsageError(f"'{run_dir}' has no circuit.json (not a finished run directory)")
    config_path = _config_path(run_dir)
    config = load_config(config_path)
    record = _read_json(circuit_path)
    fmt = _check_readable(circuit_path, record)
    positions = (record.get("positions") or {}) if isinstance(record.get("positions"), dict) else {}
    neurons: dict[str, float] = {}
    if fmt == FEATURE_FORMAT:
        kind = "feature"
        nodes, edges = _feature_graph(record)
    else:
        kind, nodes, edges, neurons = _head_graph(record)
    info = {key: record.get(key) for key in ("model", "task", "method", "metric", "config_hash", "results", "feature_graph")}
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        config_dir=config_path.parent,
        kind=kind,
        nodes=nodes,
        edges=edges,
        title=_title(record, kind, len(nodes)),
        positions=list(positions.get("names") or []),
        answer_groups=list(positions.get("answer_groups") or []),
        neurons=neurons,
        record_info=info,
    )
