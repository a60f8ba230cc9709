"""Per-position circuits over a `PositionalGraph` (the task's position groups, `circuitctl.graph.positions`).

* `PositionalEdgeSpace`: scores and membership [G_src, G_dst, U, V] over per-position edges
  (``m0@S1->a2.h3@end<k>``); an edge outside the circuit carries the ablation value at its
  source group's tokens, into its target as read by the target group's queries
  (`positional_patched_logits`). Path patching and per-token EAP-IG write these.
* `PositionalNodeSpace`: scores and membership [G, U] over per-position nodes (``a1.h0@S2``); a
  node outside the circuit carries its ablation value at that group's tokens.

Their MIB file is the projection onto the ordinary edge graph: an edge is in the circuit when it
is at any position, with the score of the position where it is largest in magnitude.
"""

from __future__ import annotations

import torch

from circuitctl.circuits.space import OwnMask, entry, mib_curve_sizes
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.positional import PositionalGraph
from circuitctl.patching.engine import BatchState, PatchingEngine


def positional_graph_for(info: dict, adapter, data, origin: str = "the circuit") -> PositionalGraph:
    """This task's per-position graph, checked against the position names a circuit was made with."""
    pgraph = PositionalGraph.from_data(adapter.graph, data, "a per-position circuit")
    pgraph.layout.check_matches(info.get("positions", {}).get("names", []), origin)
    return pgraph


def project(pgraph: PositionalGraph, scores: torch.Tensor, membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, G, U, V] -> [U, V]: the largest-|score| position's score; in the circuit at any position."""
    flat = (scores * pgraph.edge_mask).flatten(0, 1)  # [G*G, U, V]
    best = flat.abs().argmax(0, keepdim=True)
    return flat.gather(0, best)[0], (membership & pgraph.edge_mask).any(dim=(0, 1))


class PositionalEdgeSpace:
    kind = "positional_edge"
    unit = "edges"
    needs_node_ablation = True

    def __init__(self, pgraph: PositionalGraph) -> None:
        self.pgraph = pgraph
        self.graph = pgraph.base
        self.circuits_per_pass = max(1, 8 // pgraph.n_groups)  # every circuit runs once per query group

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "PositionalEdgeSpace":
        return cls(positional_graph_for(info, adapter, data))

    @property
    def mask(self) -> torch.Tensor:
        return self.pgraph.edge_mask

    @property
    def n_total(self) -> int:
        return self.pgraph.n_edges

    def info(self) -> dict:
        return {"kind": self.kind, "positions": self.pgraph.to_dict()}

    def unit_names(self) -> list[str]:
        return self.pgraph.edge_names()

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return self.pgraph.prune(membership)

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return self.pgraph.nodes_in(membership)

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        p = self.pgraph
        in_graph = self.nodes_in(membership)
        nodes = {name: entry(None, name in in_graph) for name in p.nodes()}
        member = membership.tolist()
        edges = {}
        for gs, gd, u, v in self.mask.nonzero().tolist():
            edges[p.edge_name(gs, gd, u, v)] = {"score": float(scores[gs, gd, u, v]), "in_graph": bool(member[gs][gd][u][v])}
        return {"nodes": nodes, "edges": edges}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros(self.mask.shape, device="cpu")
        membership = torch.zeros(self.mask.shape, dtype=torch.bool, device="cpu")
        for name, item in record["edges"].items():
            try:
                index = self.pgraph.edge_index(name)
            except (KeyError, ValueError) as exc:
                raise UsageError(f"{origin}: per-position edge '{name}' does not exist for this model and task") from exc
            scores[index] = float(item.get("score") or 0.0)
            membership[index] = bool(item.get("in_graph", False))
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        from circuitctl.circuits.edges import EdgeSpace

        edge_scores, edge_membership = project(self.pgraph, scores, membership)
        return EdgeSpace(self.graph).mib(edge_scores, edge_membership, d_model)

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.unit_drawing import positional_dot

        p = self.pgraph
        edges = [
            (p.upstream_name(gs, u), p.downstream_name(gd, v), float(scores[gs, gd, u, v]))
            for gs, gd, u, v in (membership & p.edge_mask).nonzero().tolist()
        ]
        return positional_dot(edges, list(p.names), self.graph.spec.n_layers, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        return mib_curve_sizes(self.n_total)

    def patcher(self, engine: PatchingEngine) -> "PositionalPatcher":
        return PositionalPatcher(engine, self.pgraph)


class PositionalNodeSpace(OwnMask):
    kind = "positional_node"
    unit = "nodes"
    needs_node_ablation = True

    def __init__(self, pgraph: PositionalGraph) -> None:
        self.pgraph = pgraph
        self.graph = pgraph.base
        self._mask = torch.ones(pgraph.n_groups, pgraph.base.n_upstream, dtype=torch.bool, device="cpu")
        self.circuits_per_pass = max(1, 8 // pgraph.n_groups)

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "PositionalNodeSpace":
        return cls(positional_graph_for(info, adapter, data))

    def info(self) -> dict:
        return {"kind": self.kind, "positions": self.pgraph.to_dict()}

    def unit_names(self) -> list[str]:
        return [self.pgraph.upstream_name(g, u) for g, u in self._mask.nonzero().tolist()]

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return membership

    def kept_edges(self, keep: torch.Tensor) -> torch.Tensor:
        """Bool [..., G, G, U, V]: per-position edges whose sender node u@g stays."""
        return self.pgraph.edge_mask.to(keep.device) & keep[..., :, None, :, None]

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return {self.pgraph.upstream_name(g, u) for g, u in membership.nonzero().tolist()}

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        p = self.pgraph
        nodes = {
            p.upstream_name(g, u): entry(scores[g, u], membership[g, u]) for g in range(p.n_groups) for u in range(p.base.n_upstream)
        }
        return {"nodes": nodes, "edges": {}}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros(self._mask.shape, device="cpu")
        membership = torch.zeros(self._mask.shape, dtype=torch.bool, device="cpu")
        for name, item in record["nodes"].items():
            try:
                node = naming.parse_node(name)
            except ValueError as exc:
                raise UsageError(f"{origin}: {exc}") from exc
            if node.kind == "logits":
                continue
            if node.position not in self.pgraph.group_index or node.base not in self.graph.upstream_index:
                raise UsageError(f"{origin}: per-position node '{name}' does not exist for this model and task")
            index = (self.pgraph.group_index[node.position], self.graph.upstream_index[node.base])
            scores[index] = float(item.get("score") or 0.0)
            membership[index] = bool(item.get("in_graph", False))
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        return None

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.unit_drawing import positional_dot

        p = self.pgraph
        receivers = self.nodes_in(membership)
        edges = []
        for gs, gd, u, v in self.kept_edges(membership).nonzero().tolist():
            receiver = p.node_name(gd, v)
            if naming.parse_node(receiver).kind != "logits" and receiver not in receivers:
                continue
            edges.append((p.upstream_name(gs, u), p.downstream_name(gd, v), float(scores[gs, u])))
        return positional_dot(edges, list(p.names), self.graph.spec.n_layers, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        return mib_curve_sizes(self.n_total)

    def patcher(self, engine: PatchingEngine) -> "PositionalPatcher":
        return PositionalPatcher(engine, self.pgraph, self.kept_edges)


class PositionalPatcher:
    """Per-position edges outside the circuit carry the ablation value (`positional_patched_logits`)."""

    def __init__(self, engine: PatchingEngine, pgraph: PositionalGraph, kept_edges=None) -> None:
        self.engine, self.pgraph = engine, pgraph
        self.edge_mask = pgraph.edge_mask.to(engine.adapter.device)
        self.kept_edges = kept_edges  # per-position node circuits: nodes -> the edges they keep

    def prepare(self, state: BatchState) -> BatchState:
        return state

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        from circuitctl.models.unit_patching import positional_patched_logits

        kept = keep if self.kept_edges is None else self.kept_edges(keep)
        groups = self.pgraph.layout.assign(state.batch).to(self.engine.adapter.device)
        return positional_patched_logits(
            self.engine.adapter, state.clean, state.ablation_outputs, self.edge_mask & ~kept, groups, state.batch.answer_positions
        )
