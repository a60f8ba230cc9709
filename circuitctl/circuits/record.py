"""The circuit file (``circuit.json``): one typed, versioned record for every kind of circuit.

Schema version 2 (``"format": "circuitctl.circuit"``):

    schema_version, format, created, model, task, method, metric, ablation, selection, seed,
    config, config_hash, library_versions, timings, results      -- provenance and results
    graph      the model's graph shape (layers, heads, MLPs, KV heads)
    space      {"kind": edge | node | neuron | positional_edge | positional_node | feature, ...}:
               what the circuit is made of, and what is needed to rebuild it (positions, SAEs)
    nodes      {name: {"in_graph", "score"[, "label"]}}
    edges      {name: {"score", "in_graph"}}
    neurons    {name: {"in_graph", "score"}}   (neuron circuits only)

`load_circuit_file` reads this format, our version-1 files (edge, node, neuron and
per-position circuits, and the separate ``circuitctl.feature_circuit`` format of feature
circuits) and MIB / EAP-IG files, and returns a version-2 record; nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from circuitctl.errors import UsageError
from circuitctl.io.files import write_json
from circuitctl.io.mib import is_mib

SCHEMA_VERSION = 2
FORMAT = "circuitctl.circuit"
V1_FEATURE_FORMAT = "circuitctl.feature_circuit"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeEntry(_Strict):
    in_graph: bool
    score: Optional[float] = None
    label: Optional[str] = None  # e.g. an SAE feature's top-activating tokens


class EdgeEntry(_Strict):
    score: Optional[float] = None
    in_graph: bool


class EdgeSpaceInfo(_Strict):
    kind: Literal["edge"]


class NodeSpaceInfo(_Strict):
    kind: Literal["node"]


class NeuronSpaceInfo(_Strict):
    kind: Literal["neuron"]
    d_mlp: int


class Positions(BaseModel):
    model_config = ConfigDict(extra="allow")
    names: list[str]
    kind: Literal["labels", "absolute"] = "labels"


class PositionalEdgeSpaceInfo(_Strict):
    kind: Literal["positional_edge"]
    positions: Positions


class PositionalNodeSpaceInfo(_Strict):
    kind: Literal["positional_node"]
    positions: Positions


class FeatureSpaceInfo(_Strict):
    kind: Literal["feature"]
    sites: list[str]
    sae_sources: dict[str, Any]
    aggregation: Literal["sum", "none"]
    positions: Optional[Positions] = None
    node_threshold: float = 0.0
    edge_threshold: float = 0.0
    stats: dict[str, Any] = Field(default_factory=dict)


SpaceInfo = Annotated[
    Union[EdgeSpaceInfo, NodeSpaceInfo, NeuronSpaceInfo, PositionalEdgeSpaceInfo, PositionalNodeSpaceInfo, FeatureSpaceInfo],
    Field(discriminator="kind"),
]


class CircuitRecord(_Strict):
    """A circuit file. Provenance sections are free-form records of what ran (config, versions...)."""

    schema_version: Literal[2]
    format: Literal["circuitctl.circuit"]
    created: Optional[str] = None
    model: dict[str, Any] = Field(default_factory=dict)
    task: dict[str, Any] = Field(default_factory=dict)
    task_signal: Optional[dict[str, Any]] = None  # circuitctl.checks: gap, its standard error, clean accuracy, ...
    method: dict[str, Any] = Field(default_factory=dict)
    metric: Optional[str] = None
    ablation: dict[str, Any] = Field(default_factory=dict)
    selection: Optional[dict[str, Any]] = None
    seed: Optional[int] = None
    config: dict[str, Any] = Field(default_factory=dict)
    config_hash: Optional[str] = None
    library_versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    results: dict[str, Any] = Field(default_factory=dict)
    graph: dict[str, Any] = Field(default_factory=dict)
    space: SpaceInfo
    nodes: dict[str, NodeEntry]
    edges: dict[str, EdgeEntry]
    neurons: Optional[dict[str, NodeEntry]] = None


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def circuit_record(provenance: dict[str, Any], graph: dict, space_info: dict, body: dict) -> dict[str, Any]:
    """The record as written: fields in the schema's order, checked against it."""
    record = {"schema_version": SCHEMA_VERSION, "format": FORMAT, **provenance, "graph": graph, "space": space_info, **body}
    try:
        CircuitRecord.model_validate(record)
    except ValidationError as exc:  # a bug: what we write must be what we read
        raise RuntimeError(f"circuit record does not match schema {SCHEMA_VERSION}: {exc}") from exc
    return record


def write_circuit_file(path: Path, record: dict[str, Any]) -> None:
    write_json(path, record)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedCircuit:
    record: dict[str, Any]  # a version-2 record (upgraded when the file is older or MIB's)
    origin: str  # the file, for messages
    source: str  # "circuitctl v2" | "circuitctl v1" | "MIB"

    @property
    def kind(self) -> str:
        return self.record["space"]["kind"]


def circuit_path(path: Path) -> Path:
    """A circuit file, or a run directory's circuit.json."""
    path = Path(path)
    return path / "circuit.json" if path.is_dir() else path


def load_circuit_file(path: Path) -> LoadedCircuit:
    """Read a circuit file of any supported version or format (see the module docstring)."""
    file = circuit_path(path)
    if not file.is_file():
        raise UsageError(f"circuit file '{file}' does not exist")
    try:
        raw = json.loads(file.read_text())
    except UnicodeDecodeError as exc:
        raise UsageError(f"{file}: not a text file ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"{file}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    origin = str(file)
    if not isinstance(raw, dict):
        raise UsageError(f"{file}: not a circuit file (a JSON object with 'nodes' and 'edges')")
    if raw.get("format") == V1_FEATURE_FORMAT:
        record, source = _upgrade_v1_features(raw, origin), "circuitctl v1"
    elif raw.get("format") == FORMAT:
        version = raw.get("schema_version", 0)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise UsageError(f"{file}: schema version {version} is newer than this circuitctl reads ({SCHEMA_VERSION}); upgrade circuitctl")
        record, source = (raw, "circuitctl v2") if version == SCHEMA_VERSION else (_upgrade_v1(raw, origin), "circuitctl v1")
    elif is_mib(raw):
        record, source = _from_mib(raw, origin), "MIB"
    else:
        raise UsageError(f"{file}: not a circuit file (no 'edges' mapping)")
    try:
        CircuitRecord.model_validate(record)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][:3]))}: {e['msg']}" for e in exc.errors()[:3])
        raise UsageError(f"{file}: malformed circuit file: {problems}") from exc
    return LoadedCircuit(record, origin, source)


def _from_mib(raw: dict, origin: str) -> dict:
    """A MIB / EAP-IG file as an edge circuit record (its cfg as the graph shape)."""
    cfg = raw.get("cfg") if isinstance(raw.get("cfg"), dict) else {}
    nodes = raw.get("nodes") if isinstance(raw.get("nodes"), dict) else {}
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "graph": {k: v for k, v in cfg.items() if k != "d_model"},
        "space": {"kind": "edge"},
        "nodes": {name: _node(item, origin, name) for name, item in nodes.items()},
        "edges": {name: _edge(item, origin, name) for name, item in raw["edges"].items()},
    }


def _node(item: Any, origin: str, name: str) -> dict:
    if not isinstance(item, dict):
        raise UsageError(f"{origin}: node '{name}' must map to {{in_graph, score}}")
    return {"in_graph": bool(item.get("in_graph", False)), "score": _score(item.get("score"), origin, name)}


def _edge(item: Any, origin: str, name: str) -> dict:
    if not isinstance(item, dict):
        raise UsageError(f"{origin}: edge '{name}' must map to {{score, in_graph}}")
    return {"score": _score(item.get("score"), origin, name), "in_graph": bool(item.get("in_graph", False))}


def _score(value: Any, origin: str, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{origin}: '{name}' has a score that is not a number: {value!r}")
    return float(value)


_ABSOLUTE = re.compile(r"@(\d+)(?=$|<|->)")


def _upgrade_v1(raw: dict, origin: str) -> dict:
    """Our version-1 file (edge, node, neuron or per-position circuit) as a version-2 record."""
    if not isinstance(raw.get("edges"), dict):
        raise UsageError(f"{origin}: not a circuit file (no 'edges' mapping)")
    granularity = raw.get("granularity", "edge")
    positions = raw.get("positions")
    rename = lambda name: name  # noqa: E731
    if positions:
        kind = "positional_node" if granularity == "node" else "positional_edge"
        names = list(positions.get("names", []))
        if positions.get("kind") == "absolute":  # version 1 named token positions 0, 1, ...; now t0, t1, ..., end
            last = len(names) - 1
            new = {str(i): ("end" if i == last else f"t{i}") for i in range(len(names))}
            names = [new[n] for n in names]
            rename = lambda name: _ABSOLUTE.sub(lambda m: "@" + new.get(m.group(1), m.group(1)), name)  # noqa: E731
        space = {"kind": kind, "positions": {"names": names, "kind": positions.get("kind", "labels")}}
    elif granularity == "node":
        space = {"kind": "node"}
    elif granularity == "neuron":
        space = {"kind": "neuron", "d_mlp": int(raw.get("d_mlp") or 0)}
    else:
        space = {"kind": "edge"}
    record = {key: value for key, value in raw.items() if key not in ("granularity", "positions", "d_mlp", "nodes", "edges", "neurons")}
    record.update(schema_version=SCHEMA_VERSION, space=space)
    record["nodes"] = {rename(name): _node(item, origin, name) for name, item in (raw.get("nodes") or {}).items()}
    record["edges"] = {rename(name): _edge(item, origin, name) for name, item in raw["edges"].items()}
    if "neurons" in raw:
        record["neurons"] = {name: _node(item, origin, name) for name, item in raw["neurons"].items()}
    return record


def _upgrade_v1_features(raw: dict, origin: str) -> dict:
    """A version-1 feature-circuit file (``circuitctl.feature_circuit``) as a version-2 record."""
    graph = raw.get("feature_graph")
    if not isinstance(graph, dict) or not isinstance(raw.get("nodes"), dict) or not isinstance(raw.get("edges"), dict):
        raise UsageError(f"{origin}: a feature circuit needs 'feature_graph', 'nodes' and 'edges'")
    positions = graph.get("positions")
    space = {
        "kind": "feature",
        "sites": list(graph.get("sites") or []),
        "sae_sources": dict(graph.get("sae_sources") or {}),
        "aggregation": graph.get("aggregation", "sum"),
        "positions": {"names": list(positions), "kind": "absolute"} if positions else None,
        "node_threshold": float(graph.get("node_threshold", 0.0)),
        "edge_threshold": float(graph.get("edge_threshold", 0.0)),
        "stats": dict(graph.get("stats") or {}),
    }
    record = {key: value for key, value in raw.items() if key not in ("feature_graph", "nodes", "edges")}
    record.update(schema_version=SCHEMA_VERSION, format=FORMAT, graph={}, space=space)
    nodes = {}
    for name, item in raw["nodes"].items():
        node = _node(item, origin, name)
        if isinstance(item, dict) and isinstance(item.get("label"), str):
            node["label"] = item["label"]
        nodes[name] = node
    record["nodes"] = nodes
    record["edges"] = {name: _edge(item, origin, name) for name, item in raw["edges"].items()}
    return record
