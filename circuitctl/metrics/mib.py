"""MIB's faithfulness curve, exactly as the MIB circuit-track evaluation computes it.

MIB (Mueller et al. 2025) evaluates circuits of the top 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50 and
100 % of a graph's edges (or nodes) on the EAP-IG library's reference graph, whose rules differ
from circuitctl's own in three ways that change CPR and CMD on small graphs and tied scores:

* it takes ``int(fraction * n)`` units (zero units at the smallest fractions of a small graph),
  where n counts every edge of the reference graph: that graph always has MLP nodes, so an
  attention-only model's n includes MLP edges (with score 0);
* it ranks with ``torch.argsort(scores.view(-1), descending=True)`` over the reference's
  ``[n_forward, n_backward]`` matrix (not a stable sort: ties fall where that sort puts them);
* every circuit is pruned as the reference prunes it, twice: `apply_topn` calls `Graph.prune`
  and `evaluate_graph` calls it again on the result (`reference_prune`): nodes without an
  incoming or outgoing edge (the input counts as having input) are dropped with their edges
  until the node set stops changing.

`mib_edge_circuits` and `mib_node_circuits` reproduce this for edge and node circuits of ungrouped graphs; circuitctl's own
rule (at least one unit, rounding up, a stable sort, no pruning) stays available as
``evaluate faithfulness --curve circuitctl``.
"""

from __future__ import annotations

import torch

from circuitctl.graph.graph import Graph

FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's grid, as fractions


class ReferenceLayout:
    """The EAP-IG reference graph's index layout for a model shape (MLP nodes always present)."""

    def __init__(self, graph: Graph) -> None:
        spec = graph.spec
        if spec.grouped:
            raise ValueError("MIB's reference graph has one k/v input per head; grouped-query graphs have no exact MIB layout")
        L, H = spec.n_layers, spec.n_heads
        self.n_forward = 1 + L * (H + 1)
        self.n_backward = L * (3 * H + 1) + 1
        # our upstream/downstream orders are the reference's with the MLPs left out when there are none
        forward = [0]
        backward: list[int] = []
        for layer in range(L):
            first = 1 + layer * (H + 1)
            forward += list(range(first, first + H)) + ([first + H] if spec.has_mlps else [])
            start = layer * (3 * H + 1)
            backward += list(range(start, start + 3 * H)) + ([start + 3 * H] if spec.has_mlps else [])
        backward.append(self.n_backward - 1)
        self.forward = torch.tensor(forward, device="cpu")
        self.backward = torch.tensor(backward, device="cpu")
        # real edges: every input reads the outputs before it (an MLP its own layer's heads unless parallel)
        prefix = []
        for layer in range(L):
            prefix += [1 + layer * (H + 1)] * (3 * H)
            prefix.append(1 + layer * (H + 1) + (0 if spec.parallel_attn_mlp else H))
        prefix.append(self.n_forward)
        self.real = torch.arange(self.n_forward, device="cpu")[:, None] < torch.tensor(prefix, device="cpu")[None, :]
        # which backward inputs belong to which forward node (a head's q/k/v, an MLP's input)
        self.forward_to_backward = torch.zeros(self.n_forward, self.n_backward, dtype=torch.bool, device="cpu")
        for layer in range(L):
            first, start = 1 + layer * (H + 1), layer * (3 * H + 1)
            for h in range(H):
                for c in range(3):
                    self.forward_to_backward[first + h, start + c * H + h] = True
            self.forward_to_backward[first + H, start + 3 * H] = True

    def embed(self, values: torch.Tensor) -> torch.Tensor:
        """Our [U, V] tensor in the reference's [n_forward, n_backward] layout (zeros elsewhere)."""
        out = torch.zeros(self.n_forward, self.n_backward, dtype=values.dtype, device="cpu")
        out[self.forward[:, None], self.backward[None, :]] = values
        return out

    def restrict(self, values: torch.Tensor) -> torch.Tensor:
        """The reference layout's [n_forward, n_backward] tensor on our [U, V] indices."""
        return values[self.forward[:, None], self.backward[None, :]]


def reference_prune(in_graph: torch.Tensor, nodes_in_graph: torch.Tensor, layout: ReferenceLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of the reference's `Graph.prune`: recompute the nodes (an outgoing and an incoming
    edge; the input always counts as having input), drop the edges of nodes that are not among
    them, and stop when the recomputed node set equals the previous one. Returns (edges, nodes)."""
    in_graph, nodes = in_graph.clone(), nodes_in_graph.clone()
    f2b = layout.forward_to_backward.float()
    while True:
        outgoing = in_graph.any(dim=1)
        incoming = (in_graph.any(dim=0).float() @ f2b.T) > 0
        incoming[0] = True
        new_nodes = outgoing & incoming
        same = torch.equal(new_nodes, nodes)
        nodes = new_nodes
        backward_in = nodes.float() @ f2b
        backward_in[-1] = 1  # the logits are always there
        in_graph &= (nodes.float()[:, None] * backward_in[None, :]) > 0
        if same:
            return in_graph, nodes


def evaluated_circuit(in_graph: torch.Tensor, nodes: torch.Tensor, layout: ReferenceLayout) -> torch.Tensor:
    """The circuit MIB evaluates: pruned by `apply_topn`, then again by `evaluate_graph`."""
    in_graph, nodes = reference_prune(in_graph, nodes, layout)
    return reference_prune(in_graph, nodes, layout)[0]


def _nodes_with_edges(in_graph: torch.Tensor, layout: ReferenceLayout) -> torch.Tensor:
    """apply_topn(reset=True)'s nodes: those with an outgoing and an incoming edge (the input always has input)."""
    incoming = (in_graph.any(dim=0).float() @ layout.forward_to_backward.float().T) > 0
    incoming[0] = True
    return in_graph.any(dim=1) & incoming


def mib_edge_circuits(graph: Graph, scores: torch.Tensor, absolute: bool) -> tuple[list[int], torch.Tensor]:
    """(units requested at each of MIB's fractions, circuits [10, U, V] as MIB builds them)."""
    layout = ReferenceLayout(graph)
    key = layout.embed(scores.float().cpu() * graph.edge_mask)
    key = key.abs() if absolute else key
    key[~layout.real] = -torch.inf
    order = torch.argsort(key.view(-1), descending=True)
    n_edges = int(layout.real.sum())
    sizes, circuits = [], []
    for fraction in FRACTIONS:
        n = int(fraction * n_edges)
        in_graph = torch.zeros(layout.n_forward * layout.n_backward, dtype=torch.bool, device="cpu")
        in_graph[order[:n]] = True
        in_graph = in_graph.view(layout.n_forward, layout.n_backward)
        in_graph = evaluated_circuit(in_graph, _nodes_with_edges(in_graph, layout), layout)
        sizes.append(n)
        circuits.append(layout.restrict(in_graph) & graph.edge_mask)
    return sizes, torch.stack(circuits)


def mib_node_circuits(graph: Graph, scores: torch.Tensor, absolute: bool) -> tuple[list[int], torch.Tensor]:
    """Node circuits [10, U] at MIB's fractions: the top int(fraction * n_nodes) scored nodes, every
    outgoing edge of a kept node, then the reference's pruning; a node stays if one of its edges does."""
    layout = ReferenceLayout(graph)
    node_scores = torch.full((layout.n_forward,), -torch.inf, device="cpu")
    node_scores[layout.forward] = (scores.abs() if absolute else scores).float().cpu()
    scored = torch.zeros(layout.n_forward, dtype=torch.bool, device="cpu")
    scored[layout.forward] = True  # MLP nodes of an attention-only model are unscored (NaN in the reference)
    order = torch.argsort(node_scores, descending=True)
    n_nodes = int(scored.sum())
    sizes, circuits = [], []
    for fraction in FRACTIONS:
        n = int(fraction * n_nodes)
        nodes = torch.zeros(layout.n_forward, dtype=torch.bool, device="cpu")
        nodes[order[:n]] = True
        nodes |= ~scored  # unscored nodes always stay (the reference's rule)
        in_graph = evaluated_circuit(layout.real & nodes[:, None], nodes, layout)
        kept = in_graph.any(dim=1)[layout.forward]
        sizes.append(n)
        circuits.append(kept)
    return sizes, torch.stack(circuits)
