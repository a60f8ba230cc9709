"""Per-position graphs: every node split by token position group.

The groups are the task's `circuitctl.graph.positions.PositionLayout` (labels, ``end``,
``other``; or one group per token for unlabelled equal-length prompts). Node names carry the
group after ``@`` (``a3.h0@end``, ``a3.h0@end<k>``, see `circuitctl.graph.naming`).

Edges (scores and membership are dense ``[G_src, G_dst, U, V]`` tensors over the base graph's
``[U, V]``):

* into a head's query, an MLP or the logits: from the same position group only;
* into a head's key or value *as read by the queries of group g'*: from every group g whose
  tokens come at or before some token of g' in at least one prompt (causal attention);
* into the logits: only at the answer position's group.

So ``m0@S1->a2.h3@end<k>`` is m0's output at S1 feeding the key that a2.h3's queries at
``end`` read.
"""

from __future__ import annotations

from functools import cached_property

import networkx as nx
import torch

from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.graph.positions import PositionLayout

class PositionalGraph:
    """Names and masks of a per-position graph over a base `Graph`."""

    def __init__(self, graph: Graph, layout: PositionLayout, reach: torch.Tensor) -> None:
        self.base = graph
        self.layout = layout
        self.names = layout.names
        self.reach = reach.bool()  # [G_src, G_dst]: some token of src is at or before one of dst
        self.answer_groups = torch.zeros(layout.n_groups, dtype=torch.bool, device="cpu")  # [G]: only the answer's group reads logits
        self.answer_groups[layout.answer] = True
        self.group_index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def from_data(cls, graph: Graph, data, what: str = "a per-position graph") -> "PositionalGraph":
        layout = PositionLayout.from_data(data, what)
        G = layout.n_groups
        reach = torch.zeros(G, G, dtype=torch.bool, device="cpu")
        for batch in data.batches(256):
            groups = layout.assign(batch)  # [B, P]
            index = torch.arange(groups.shape[1], device="cpu")[None].expand_as(groups)
            big = groups.shape[1] + 1
            first = torch.stack([torch.where(groups == g, index, big).min(1).values for g in range(G)])  # [G, B]
            last = torch.stack([torch.where(groups == g, index, -1).max(1).values for g in range(G)])
            present = last >= 0
            reach |= ((first[:, None] <= last[None, :]) & present[:, None] & present[None, :]).any(-1)
        return cls(graph, layout, reach)

    @property
    def n_groups(self) -> int:
        return len(self.names)

    @cached_property
    def kv_inputs(self) -> torch.Tensor:
        """Bool [V]: downstream inputs that are a head's key or value."""
        return torch.tensor([naming.parse_node(name).channel in ("k", "v") for name in self.base.downstream], device="cpu")

    @cached_property
    def edge_mask(self) -> torch.Tensor:
        """Bool [G_src, G_dst, U, V]: the real per-position edges."""
        G, base = self.n_groups, self.base
        kv = self.kv_inputs[None, None, None, :]
        same = torch.eye(G, dtype=torch.bool, device="cpu")[:, :, None, None]
        logits = torch.zeros(base.n_downstream, dtype=torch.bool, device="cpu")
        logits[base.logits_index] = True
        at_answer = ~logits[None, None, None, :] | self.answer_groups[None, :, None, None]
        cross = self.reach[:, :, None, None] & kv
        return base.edge_mask[None, None] & ((same & ~kv) | cross) & at_answer

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    # -- names ---------------------------------------------------------------------------
    def upstream_name(self, g: int, u: int) -> str:
        return f"{self.base.upstream[u]}@{self.names[g]}"

    def downstream_name(self, g: int, v: int) -> str:
        return naming.positioned(self.base.downstream[v], self.names[g])

    def node_name(self, g: int, v: int) -> str:
        """The node (without channel) that downstream input v at group g belongs to."""
        return f"{self.base.node_of_input(v)}@{self.names[g]}"

    def edge_name(self, gs: int, gd: int, u: int, v: int) -> str:
        return naming.edge(self.upstream_name(gs, u), self.downstream_name(gd, v))

    def edge_index(self, name: str) -> tuple[int, int, int, int]:
        up, down = naming.parse_edge(name)
        pu, pd = naming.parse_node(up), naming.parse_node(down)
        if pu.position not in self.group_index or pd.position not in self.group_index:
            raise KeyError(name)
        down_base = pd.base + (f"<{pd.channel}>" if pd.channel else "")
        if pu.base not in self.base.upstream_index or down_base not in self.base.downstream_index:
            raise KeyError(name)
        index = (
            self.group_index[pu.position],
            self.group_index[pd.position],
            self.base.upstream_index[pu.base],
            self.base.downstream_index[down_base],
        )
        if not bool(self.edge_mask[index]):
            raise KeyError(name)
        return index

    def mask_to_edges(self, mask: torch.Tensor) -> list[str]:
        return [self.edge_name(*map(int, idx)) for idx in (mask & self.edge_mask).nonzero().tolist()]

    def edge_names(self) -> list[str]:
        return self.mask_to_edges(self.edge_mask)

    def nodes(self) -> list[str]:
        names = [self.upstream_name(g, u) for g in range(self.n_groups) for u in range(self.base.n_upstream)]
        return names + [f"{naming.LOGITS}@{self.names[g]}" for g in range(self.n_groups) if self.answer_groups[g]]

    def edge_nodes(self, gs: int, gd: int, u: int, v: int) -> tuple[str, str]:
        return self.upstream_name(gs, u), self.node_name(gd, v)

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        nodes: set[str] = set()
        for idx in (membership & self.edge_mask).nonzero().tolist():
            nodes.update(self.edge_nodes(*idx))
        return nodes

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        """Drop edges on no path from an input node to a logits node (tree-shaking)."""
        dag = nx.DiGraph()
        edges = (membership & self.edge_mask).nonzero().tolist()
        for idx in edges:
            dag.add_edge(*self.edge_nodes(*idx))
        sources = [n for n in dag if naming.parse_node(n).kind == "input"]
        sinks = [n for n in dag if naming.parse_node(n).kind == "logits"]
        reachable = set(sources).union(*(nx.descendants(dag, s) for s in sources)) if sources else set()
        useful = set(sinks).union(*(nx.ancestors(dag, s) for s in sinks)) if sinks else set()
        keep = torch.zeros_like(membership)
        for idx in edges:
            up, down = self.edge_nodes(*idx)
            if up in reachable and up in useful and down in reachable and down in useful:
                keep[tuple(idx)] = True
        return keep

    def to_dict(self) -> dict:
        return {**self.layout.to_dict(), "reach": self.reach.int().tolist()}
