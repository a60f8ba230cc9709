"""Tree-shaking an edge circuit (ACDC's), and the nodes it touches."""

from __future__ import annotations

import networkx as nx
import torch

from circuitctl.graph import naming
from circuitctl.graph.graph import Graph


def prune(membership: torch.Tensor, graph: Graph) -> torch.Tensor:
    """Drop edges that lie on no path from `input` to `logits` (ACDC's tree-shaking)."""
    dag = nx.DiGraph()
    edges = membership.nonzero().tolist()
    for u, v in edges:
        dag.add_edge(graph.upstream[u], graph.node_of_input(v))
    for group, heads in graph.kv_group_members.items():  # grouped-query attention: a KV group feeds its heads
        if group in dag:
            dag.add_edges_from((group, head) for head in heads)
    if naming.INPUT not in dag or naming.LOGITS not in dag:
        return torch.zeros_like(membership)
    reachable = nx.descendants(dag, naming.INPUT) | {naming.INPUT}
    useful = nx.ancestors(dag, naming.LOGITS) | {naming.LOGITS}
    keep = torch.zeros_like(membership)
    for u, v in edges:
        up, down = graph.upstream[u], graph.node_of_input(v)
        if up in reachable and up in useful and down in reachable and down in useful:
            keep[u, v] = True
    return keep


def nodes_in(membership: torch.Tensor, graph: Graph) -> set[str]:
    nodes = set()
    groups = graph.kv_group_members
    for u, v in membership.nonzero().tolist():
        nodes.add(graph.upstream[u])
        down = graph.node_of_input(v)
        if down not in groups:  # a KV group is not a node of its own; its heads count through their edges
            nodes.add(down)
    return nodes
