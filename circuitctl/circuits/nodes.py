"""Node circuits: scores and membership [U] over the upstream nodes (input, heads, MLPs).

A node outside the circuit has its output replaced by its ablation value everywhere, which
is exactly ablating all of its outgoing edges; the logits are always kept.
"""

from __future__ import annotations

import torch

from circuitctl.circuits.edges import EdgePatcher
from circuitctl.circuits.space import OwnMask, entry, mib_curve_sizes
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.patching.engine import BatchState, PatchingEngine


class NodeSpace(OwnMask):
    kind = "node"
    unit = "nodes"
    needs_node_ablation = True
    circuits_per_pass = 8

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._mask = torch.ones(graph.n_upstream, dtype=torch.bool, device="cpu")

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "NodeSpace":
        return cls(adapter.graph)

    def info(self) -> dict:
        return {"kind": self.kind}

    def unit_names(self) -> list[str]:
        return list(self.graph.upstream)

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return membership

    def kept_edges(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool [..., U, V]: the edges that stay when only the nodes `keep` [..., U] stay."""
        return self.graph.edge_mask.to(keep.device) & keep[..., :, None]

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return {self.graph.upstream[u] for u in membership.nonzero().flatten().tolist()} | {naming.LOGITS}

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        g = self.graph
        nodes = {name: entry(scores[u], membership[u]) for u, name in enumerate(g.upstream)}
        nodes[naming.LOGITS] = entry(None, True)
        kept = self.kept_edges(membership).tolist()
        edges = {}
        for v in range(g.n_downstream):
            reader = g.node_of_input(v)
            read = reader == naming.LOGITS or (reader in g.upstream_index and bool(membership[g.upstream_index[reader]]))
            if reader in g.kv_group_members:  # a KV group's input is read when any of its heads is kept
                read = any(bool(membership[g.upstream_index[h]]) for h in g.kv_group_members[reader])
            for u in range(g.prefix_len[v]):
                edges[g.edge_name(u, v)] = {"score": None, "in_graph": kept[u][v] and read}
        return {"nodes": nodes, "edges": edges}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros(self.graph.n_upstream, device="cpu")
        membership = torch.zeros(self.graph.n_upstream, dtype=torch.bool, device="cpu")
        for name, item in record["nodes"].items():
            if name == naming.LOGITS:
                continue
            if name not in self.graph.upstream_index:
                if _absent_mlp(self.graph, name, item):
                    continue
                raise UsageError(f"{origin}: node '{name}' does not exist in this model's graph")
            u = self.graph.upstream_index[name]
            scores[u] = float(item.get("score") or 0.0)
            membership[u] = bool(item.get("in_graph", False))
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        """As the EAP-IG reference writes a node-scored graph: nodes ``{"in_graph", "score"}`` (the
        logits, which have no score, ``{"in_graph"}``), edges ``{"score": 0.0, "in_graph"}``."""
        from circuitctl.io.mib import mib_record

        body = self.entries(scores, membership)
        nodes = {
            name: {"in_graph": item["in_graph"]} if name == naming.LOGITS else {"in_graph": item["in_graph"], "score": item["score"]}
            for name, item in body["nodes"].items()
        }
        edges = {name: {"score": 0.0, "in_graph": item["in_graph"]} for name, item in body["edges"].items()}
        return mib_record(self.graph.spec.to_dict(), d_model, nodes, edges)

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.graphviz import to_dot

        graph = self.graph
        kept = self.kept_edges(membership)
        in_circuit = self.nodes_in(membership)
        for v in range(graph.n_downstream):
            if graph.node_of_input(v) not in in_circuit:
                kept[:, v] = False
        return to_dot(graph, scores[:, None].expand(-1, graph.n_downstream), kept, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        return mib_curve_sizes(self.n_total)

    def patcher(self, engine: PatchingEngine) -> "NodePatcher":
        return NodePatcher(engine, self)


def _absent_mlp(graph: Graph, name: str, item: dict) -> bool:
    """An MLP node of the EAP-IG reference graph that this attention-only model lacks, out of the circuit."""
    try:
        node = naming.parse_node(name)
    except ValueError:
        return False
    return not graph.spec.has_mlps and node.kind == "mlp" and not item.get("in_graph") and not float(item.get("score") or 0.0)


class NodePatcher:
    def __init__(self, engine: PatchingEngine, space: NodeSpace) -> None:
        self.edges = EdgePatcher(engine, space.graph.edge_mask)
        self.space = space

    def prepare(self, state: BatchState) -> BatchState:
        return state

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        return self.edges.logits(state, self.space.kept_edges(keep))
