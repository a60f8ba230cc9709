"""Reading a run directory for an explanation: the one place in `circuitctl.explain` that reads
circuit files.

`load_run(run_dir)` returns the run's config and the circuit's nodes and edges, whatever kind of
circuit the run holds. The file is read by `circuitctl.circuits.record.load_circuit_file`
(schema 2, our schema-1 files of every kind, MIB files), so the circuit's kind is the record's
`space.kind` (edge, node, neuron, positional_edge, positional_node, feature), never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from circuitctl.config.schema import RunConfig
from circuitctl.errors import UsageError

KINDS = ("edge", "node", "neuron", "positional_edge", "positional_node", "feature")


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
    kind: str  # the record's space.kind (see KINDS)
    nodes: dict[str, CircuitNode]  # the circuit's heads, MLPs or features (not input / logits)
    edges: dict[str, float]  # the circuit's edges and their scores
    title: str
    positions: list[str] = field(default_factory=list)  # position names of per-position circuits
    answer_groups: list[str] = field(default_factory=list)  # the position group where logits are read
    neurons: dict[str, float] = field(default_factory=dict)  # neuron circuits: m{L}.n{i} -> score
    space: dict = field(default_factory=dict)  # the record's space (feature circuits: sites, SAE sources, aggregation)
    record_info: dict = field(default_factory=dict)  # model, task, method, config_hash, results


def _config_path(run_dir: Path) -> Path:
    """config.yaml of the run; a sweep's circuits (RUN_DIR/tau-0.01/) use their parent's."""
    for candidate in (run_dir / "config.yaml", run_dir.parent / "config.yaml"):
        if candidate.is_file() and (candidate.parent == run_dir or (run_dir.parent / "sweep.json").is_file()):
            return candidate
    raise UsageError(f"'{run_dir}' has no config.yaml (not a run directory written by circuitctl discover)")


def _in_graph(mapping: dict | None) -> dict[str, dict]:
    return {name: entry for name, entry in (mapping or {}).items() if entry.get("in_graph")}


def _head_graph_node(name: str, entry: dict) -> CircuitNode | None:
    from circuitctl.graph import naming

    try:
        node = naming.parse_node(name)
    except ValueError as exc:
        raise UsageError(f"circuit node '{name}': {exc}") from exc
    if node.kind not in ("head", "mlp"):
        return None  # input, logits, KV groups of grouped-query attention
    return CircuitNode(name, node.base, node.kind, position=node.position, score=entry.get("score"), layer=node.layer, index=node.index)


def _head_graph(record: dict, kind: str) -> tuple[dict[str, CircuitNode], dict[str, float], dict[str, float]]:
    from circuitctl.graph import naming

    nodes: dict[str, CircuitNode] = {}
    neurons: dict[str, float] = {}
    if kind == "neuron":
        for name, entry in _in_graph(record.get("neurons")).items():
            try:
                layer, _ = naming.parse_neuron(name)
            except ValueError as exc:
                raise UsageError(f"circuit neuron '{name}': {exc}") from exc
            neurons[name] = float(entry.get("score") or 0.0)
            mlp = naming.mlp(layer)
            nodes.setdefault(mlp, CircuitNode(mlp, mlp, "mlp", layer=layer))
    else:
        for name, entry in _in_graph(record["nodes"]).items():
            node = _head_graph_node(name, entry)
            if node is not None:
                nodes[name] = node
    node_scores = {name: entry.get("score") for name, entry in record["nodes"].items()}
    edges = {}
    for name, entry in _in_graph(record["edges"]).items():
        score = entry.get("score")
        if score is None:  # node circuits: an edge carries its sender's score (as circuit.dot draws it)
            score = node_scores.get(name.split("->")[0])
        edges[name] = float(score) if score is not None else 0.0
    return nodes, edges, neurons


def _feature_graph(record: dict) -> tuple[dict[str, CircuitNode], dict[str, float]]:
    from circuitctl.graph import naming

    nodes = {}
    for name, entry in _in_graph(record["nodes"]).items():
        if name.split("@")[0] == naming.LOGITS:
            continue
        try:
            node = naming.parse_feature_node(name)
        except ValueError as exc:
            raise UsageError(f"feature-circuit node '{name}': {exc}") from exc
        if node.is_error:
            continue  # an SAE's error term: not a feature
        nodes[name] = CircuitNode(
            name=name,
            component=naming.feature_node(node.site, node.feature),  # type: ignore[arg-type]
            kind="feature",
            position=node.position,
            score=entry.get("score"),
            label=entry.get("label"),
            layer=naming.parse_site(node.site).layer,
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


def load_run(run_dir: Path, config: RunConfig | None = None) -> LoadedRun:
    """The run's config and its circuit's nodes and edges (see `LoadedRun`). `config`: the run's
    config when the caller has it (discover), instead of reading config.yaml again."""
    from circuitctl.circuits.record import load_circuit_file
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
    config = config if config is not None else load_config(config_path)
    record = load_circuit_file(circuit_path).record
    space = record["space"]
    kind = space["kind"]
    if kind not in KINDS:  # a newer space kind than this module knows
        raise UsageError(f"{circuit_path}: circuits of kind '{kind}' cannot be explained (known: {', '.join(KINDS)})")
    neurons: dict[str, float] = {}
    if kind == "feature":
        nodes, edges = _feature_graph(record)
    else:
        nodes, edges, neurons = _head_graph(record, kind)
    positions = space.get("positions") or {}
    answer = positions.get("answer")  # schema 2; files upgraded from schema 1 do not record it (see pipeline)
    info = {key: record.get(key) for key in ("model", "task", "method", "metric", "config_hash", "results")}
    info["graph"] = record.get("graph") or {}
    return LoadedRun(
        run_dir=run_dir,
        config=config,
        config_dir=config_path.parent,
        kind=kind,
        nodes=nodes,
        edges=edges,
        title=_title(record, kind, len(nodes)),
        positions=list(positions.get("names") or []),
        answer_groups=[answer] if answer else [],
        neurons=neurons,
        space=dict(space),
        record_info=info,
    )
