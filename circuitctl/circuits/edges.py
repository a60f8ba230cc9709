"""Edge circuits: scores and membership [U, V] over the model's edge graph (`circuitctl.graph.graph`).

An edge outside the circuit carries its upstream node's ablation value into its downstream
input (`ModelAdapter.patched_logits`); tree-shaking drops edges on no input -> logits path.
"""

from __future__ import annotations

import torch

from circuitctl.circuits.space import mib_curve_sizes
from circuitctl.errors import UsageError
from circuitctl.graph.graph import Graph
from circuitctl.graph.pruning import nodes_in, prune
from circuitctl.patching.engine import BatchState, PatchingEngine


class EdgeSpace:
    kind = "edge"
    unit = "edges"
    needs_node_ablation = True
    circuits_per_pass = 8

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "EdgeSpace":
        return cls(adapter.graph)

    @property
    def mask(self) -> torch.Tensor:
        return self.graph.edge_mask

    @property
    def n_total(self) -> int:
        return self.graph.n_edges

    def info(self) -> dict:
        return {"kind": self.kind}

    def unit_names(self) -> list[str]:
        return [self.graph.edge_name(u, v) for u, v in self.mask.nonzero().tolist()]

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return prune(membership, self.graph)

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return nodes_in(membership, self.graph)

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        graph = self.graph
        in_graph = nodes_in(membership, graph)
        nodes = {name: {"in_graph": name in in_graph, "score": None} for name in graph.nodes()}
        scores_list, member_list = scores.tolist(), membership.tolist()
        edges = {}
        for v in range(graph.n_downstream):
            for u in range(graph.prefix_len[v]):
                edges[graph.edge_name(u, v)] = {"score": float(scores_list[u][v]), "in_graph": bool(member_list[u][v])}
        return {"nodes": nodes, "edges": edges}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        graph = self.graph
        scores = torch.zeros(graph.n_upstream, graph.n_downstream, device="cpu")
        membership = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.bool, device="cpu")
        for name, item in record["edges"].items():
            try:
                u, v = graph.edge_index(name)
            except (KeyError, ValueError) as exc:
                if absent_mlp_edge(graph, name, item, origin):
                    continue
                raise UsageError(f"{origin}: edge '{name}' does not exist in this model's graph (a circuit for another model?)") from exc
            scores[u, v] = float(item.get("score") or 0.0)
            membership[u, v] = bool(item.get("in_graph", False))
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        """As the EAP-IG reference writes an edge graph: nodes ``{"in_graph"}`` (no scores), edges ``{"score", "in_graph"}``."""
        from circuitctl.io.mib import mib_record

        body = self.entries(scores, membership)
        nodes = {name: {"in_graph": item["in_graph"]} for name, item in body["nodes"].items()}
        return mib_record(self.graph.spec.to_dict(), d_model, nodes, body["edges"])

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.graphviz import to_dot

        return to_dot(self.graph, scores, membership, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        return mib_curve_sizes(self.n_total)

    def patcher(self, engine: PatchingEngine) -> "EdgePatcher":
        return EdgePatcher(engine, self.graph.edge_mask)


def absent_mlp_edge(graph: Graph, name: str, item: dict, origin: str) -> bool:
    """True for an edge to or from an MLP that this attention-only model lacks, out of the circuit
    with score 0: the EAP-IG reference graph always has MLP nodes, so its files of attention-only
    models list such edges. In the circuit (or scored), it cannot be evaluated here: refused."""
    from circuitctl.graph import naming

    if graph.spec.has_mlps:
        return False
    try:
        ends = [naming.parse_node(end) for end in naming.parse_edge(name)]
    except ValueError:
        return False
    mlps = [end.base for end in ends if end.kind == "mlp"]
    if not mlps:
        return False
    if item.get("in_graph") or float(item.get("score") or 0.0) != 0.0:
        raise UsageError(
            f"{origin}: edge '{name}' involves {mlps[0]}, an MLP this attention-only model does not have, and it is "
            f"{'in the circuit' if item.get('in_graph') else 'scored'}; such a circuit cannot be evaluated on this model"
        )
    return True


class EdgePatcher:
    """Edges outside the circuit carry the ablation value (one patched forward per circuit)."""

    def __init__(self, engine: PatchingEngine, edge_mask: torch.Tensor) -> None:
        self.engine = engine
        self.edge_mask = edge_mask.to(engine.adapter.device)

    def prepare(self, state: BatchState) -> BatchState:
        return state

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        return self.engine.edge_logits(state, self.edge_mask & ~keep)
