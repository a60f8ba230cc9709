"""Exchanging circuits with the EAP-IG library and MIB (issue 21).

`ReferenceGraph` below re-implements, independently of circuitctl, what the EAP-IG reference's
`Graph.from_json` does with a file (scores are assigned into float tensors, so a null score
fails; node scores only where given; the logits entry is skipped) and MIB's curve rule
(`apply_topn`: int(fraction * n) edges by an unstable argsort, then `prune`). It works on edge
names and Python sets, not on circuitctl's index layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import planted_context

from circuitctl.circuits.edges import EdgeSpace
from circuitctl.circuits.nodes import NodeSpace
from circuitctl.circuits.record import load_circuit_file
from circuitctl.errors import UsageError
from circuitctl.graph.graph import Graph, GraphSpec
from circuitctl.metrics.mib import FRACTIONS, mib_edge_circuits

pytestmark = pytest.mark.usefixtures("one_thread")


class ReferenceGraph:
    """The EAP-IG reference graph of a config: always with MLPs; edges named as MIB names them."""

    def __init__(self, cfg: dict) -> None:
        L, H = cfg["n_layers"], cfg["n_heads"]
        self.nodes = ["input"]
        self.edges: dict[str, tuple[str, str]] = {}  # name -> (parent, child)
        residual = ["input"]
        for layer in range(L):
            heads = [f"a{layer}.h{h}" for h in range(H)]
            self.nodes += heads + [f"m{layer}"]
            for parent in residual:
                for head in heads:
                    for c in "qkv":
                        self.edges[f"{parent}->{head}<{c}>"] = (parent, head)
            residual += heads
            for parent in residual if not cfg.get("parallel_attn_mlp") else residual[: -len(heads)]:
                self.edges[f"{parent}->m{layer}"] = (parent, f"m{layer}")
            residual.append(f"m{layer}")
        for parent in residual:
            self.edges[f"{parent}->logits"] = (parent, "logits")
        self.scores = {name: 0.0 for name in self.edges}
        self.in_graph = {name: False for name in self.edges}
        self.node_scores: dict[str, float] | None = None

    @classmethod
    def from_json(cls, record: dict) -> "ReferenceGraph":
        graph = cls(record["cfg"])
        scores = torch.zeros(len(graph.nodes))
        for name, entry in record["nodes"].items():
            if name == "logits":
                continue
            graph.nodes.index(name)  # KeyError/ValueError for a node the reference does not have
            assert isinstance(entry["in_graph"], bool)
            if "score" in entry:
                scores[graph.nodes.index(name)] = entry["score"]  # a None score raises TypeError here
                graph.node_scores = graph.node_scores or {}
                graph.node_scores[name] = float(entry["score"])
        tensor = torch.zeros(len(graph.edges))
        for i, (name, entry) in enumerate(record["edges"].items()):
            tensor[i] = entry["score"]  # likewise
            graph.scores[name] = float(entry["score"])
            graph.in_graph[name] = bool(entry["in_graph"])
        return graph

    def top_n(self, n: int, absolute: bool) -> set[str]:
        """apply_topn(n, level='edge', prune=True) with the reference's argsort over its score matrix."""
        order = {node: i for i, node in enumerate(self.nodes + ["logits"])}
        dst = self.destinations()
        matrix = torch.full((len(self.nodes), len(dst)), -torch.inf)
        where = {}
        for name, (parent, child) in self.edges.items():
            column = dst.index(name.split("->")[1])
            value = self.scores[name]
            matrix[order[parent], column] = abs(value) if absolute else value
            where[order[parent] * len(dst) + column] = name
        ranked = torch.argsort(matrix.view(-1), descending=True)[:n].tolist()
        return self.prune({where[i] for i in ranked})

    def destinations(self) -> list[str]:
        """The reference's backward order: per layer q, k, v of every head, then the MLP; the logits last."""
        L = sum(1 for node in self.nodes if node.startswith("m"))
        H = sum(1 for node in self.nodes if node.startswith("a0."))
        names = []
        for layer in range(L):
            for c in "qkv":
                names += [f"a{layer}.h{h}<{c}>" for h in range(H)]
            names.append(f"m{layer}")
        return names + ["logits"]

    def prune(self, kept: set[str]) -> set[str]:
        """What `apply_topn` and then `evaluate_graph` (each calling `Graph.prune`) leave: repeatedly
        drop nodes without an incoming (the input excepted) or outgoing kept edge, with their edges."""
        while True:
            parents = {self.edges[e][0] for e in kept}
            children = {self.edges[e][1] for e in kept} | {"input"}
            alive = (parents & children) | {"logits"}
            pruned = {e for e in kept if self.edges[e][0] in alive and self.edges[e][1] in alive}
            if pruned == kept:
                return kept
            kept = pruned


# ----------------------------------------------------------------------------------------------
# Files we write load in the reference
# ----------------------------------------------------------------------------------------------
def test_our_mib_files_load_in_the_reference_reader():
    _, context = planted_context("layernorm_mlp")
    graph = context.graph
    scores = torch.randn(graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(0)) * graph.edge_mask
    membership = (scores.abs() > 1.0) & graph.edge_mask
    edge_file = json.loads(json.dumps(EdgeSpace(graph).mib(scores, membership, 8)))
    reference = ReferenceGraph.from_json(edge_file)
    assert reference.node_scores is None  # an edge circuit: no node scores, as the reference writes it
    assert all("score" not in entry for entry in edge_file["nodes"].values())
    for name in graph.edge_names():
        u, v = graph.edge_index(name)
        assert reference.scores[name] == pytest.approx(float(scores[u, v])) and reference.in_graph[name] == bool(membership[u, v])

    node_scores = torch.arange(graph.n_upstream, dtype=torch.float32)
    node_file = json.loads(json.dumps(NodeSpace(graph).mib(node_scores, node_scores > 2, 8)))
    reference = ReferenceGraph.from_json(node_file)
    assert reference.node_scores == {name: float(i) for i, name in enumerate(graph.upstream)}
    assert all(isinstance(entry["score"], float) for entry in node_file["edges"].values())


def test_a_null_score_is_what_the_reference_cannot_read():
    """The failure the issue reports, reproduced with the reference reader: circuitctl's old files."""
    record = {"cfg": {"n_layers": 1, "n_heads": 1}, "nodes": {"input": {"in_graph": True, "score": None}}, "edges": {}}
    with pytest.raises(TypeError):
        ReferenceGraph.from_json(record)


def reference_file_of_an_attention_only_model(tmp_path, mlp_edge_in_graph: bool = False):
    """What the reference writes for circuitctl's attention-only planted model: its graph has MLPs."""
    _, context = planted_context("copy_first")
    spec = context.graph.spec
    cfg = {"n_layers": spec.n_layers, "n_heads": spec.n_heads, "parallel_attn_mlp": False, "d_model": 8}
    reference = ReferenceGraph(cfg)
    ours = {"input->a0.h0<v>", "a0.h0->logits"}
    record = {
        "cfg": cfg,
        "nodes": {name: {"in_graph": name in ("input", "a0.h0")} for name in reference.nodes + ["logits"]},
        "edges": {name: {"score": 1.0 if name in ours else 0.0, "in_graph": name in ours} for name in reference.edges},
    }
    if mlp_edge_in_graph:
        record["edges"]["a0.h0->m0"]["in_graph"] = True
    path = tmp_path / "circuit.mib.json"
    path.write_text(json.dumps(record))
    return path, context


def test_reference_files_of_attention_only_models_are_read_and_their_mlp_edges_ignored(tmp_path):
    path, context = reference_file_of_an_attention_only_model(tmp_path)
    loaded = load_circuit_file(path)
    assert any("m0" in name for name in loaded.record["edges"])
    scores, membership = EdgeSpace(context.graph).read(loaded.record, loaded.origin)
    assert set(context.graph.mask_to_edges(membership)) == {"input->a0.h0<v>", "a0.h0->logits"}
    path, context = reference_file_of_an_attention_only_model(tmp_path, mlp_edge_in_graph=True)
    loaded = load_circuit_file(path)
    with pytest.raises(UsageError, match="MLP this attention-only model does not have, and it is in the circuit"):
        EdgeSpace(context.graph).read(loaded.record, loaded.origin)


# ----------------------------------------------------------------------------------------------
# MIB's curve rule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("has_mlps", [True, False])
@pytest.mark.parametrize("absolute", [True, False])
def test_mib_curve_circuits_equal_a_direct_implementation_of_the_rule(has_mlps, absolute):
    """Tied and sparse scores on small graphs, where rounding, ties and pruning all matter."""
    graph = Graph(GraphSpec(n_layers=2, n_heads=3, has_mlps=has_mlps))
    generator = torch.Generator().manual_seed(1)
    values = torch.tensor([0.0, 0.5, -0.5, 1.0, 2.0])  # heavy ties, signed
    scores = values[torch.randint(0, 5, (graph.n_upstream, graph.n_downstream), generator=generator)] * graph.edge_mask
    sizes, circuits = mib_edge_circuits(graph, scores, absolute)
    cfg = {"n_layers": 2, "n_heads": 3, "parallel_attn_mlp": False}
    reference = ReferenceGraph(cfg)
    for name in graph.edge_names():
        u, v = graph.edge_index(name)
        reference.scores[name] = float(scores[u, v])
    n_reference = len(reference.edges)  # counts MLP edges also for an attention-only model
    assert sizes == [int(f * n_reference) for f in FRACTIONS] and sizes[0] == 0
    ours = set(graph.edge_names())
    for n, circuit in zip(sizes, circuits):
        expected = reference.top_n(n, absolute) & ours  # MLP edges of an attention-only model: counted, then dropped
        assert set(graph.mask_to_edges(circuit)) == expected, n


def test_evaluate_uses_mibs_rule_by_default_and_circuitctls_on_request(tmp_path):
    from circuitctl.config.load import validate_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.runner import discover
    from circuitctl.testing.planted import build, export

    model, task = export(build("distributed"), tmp_path / "model", tmp_path / "task")
    config = validate_config(
        {"model": {"path": str(model), "device": "cpu"}, "task": {"path": str(task)}, "method": {"name": "eap"},
         "selection": {"top_n": 12}, "output": {"dir": str(tmp_path / "run")}}
    )
    discover(config)
    mib, _ = evaluate_faithfulness(tmp_path / "run", config, None, tmp_path / "mib")
    ours, _ = evaluate_faithfulness(tmp_path / "run", config, None, tmp_path / "ours", curve_rule="circuitctl")
    assert mib.curve_rule == "mib" and ours.curve_rule == "circuitctl"
    assert mib.curve_sizes[0] == 0 and ours.curve_sizes[0] == 1  # int(0.001 n) = 0 on a small graph; circuitctl takes >= 1
    assert mib.cpr != pytest.approx(ours.cpr)  # the rules differ on this small, tied graph
    assert mib.faithfulness == ours.faithfulness  # the circuit itself is the same
