"""The edge-level computational graph as index bookkeeping over dense tensors.

Upstream outputs are ordered ``input, a0.h0..a0.h{H-1}, m0, a1.h0, ..., m{L-1}`` and
downstream inputs ``a0.h*<q>, a0.h*<k>, a0.h*<v>, m0, a1.h*<q>, ..., logits`` (with
grouped-query attention the k and v inputs are per KV group: ``a0.g*<k>, a0.g*<v>``). With this
order every downstream input reads a *prefix* of the upstream outputs, so an edge
u -> v is real exactly when ``u < prefix_len[v]``: scores and circuit membership are
plain ``[n_upstream, n_downstream]`` tensors and nodes/edges are views onto them.
Drawing and file I/O live in ``circuitctl.io``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from circuitctl.graph import naming


@dataclass(frozen=True)
class GraphSpec:
    """What the graph needs to know about a model's shape."""

    n_layers: int
    n_heads: int
    has_mlps: bool = True
    parallel_attn_mlp: bool = False  # GPT-J / NeoX: the MLP reads resid_pre, not the heads of its layer
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads per layer (None: n_heads)

    def __post_init__(self) -> None:
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def grouped(self) -> bool:
        """Grouped-query attention: k/v inputs are shared by groups of heads."""
        return self.kv_heads != self.n_heads

    def to_dict(self) -> dict:
        spec = {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "has_mlps": self.has_mlps,
            "parallel_attn_mlp": self.parallel_attn_mlp,
        }
        if self.grouped:  # ungrouped graphs keep the MIB cfg keys unchanged
            spec["n_kv_heads"] = self.kv_heads
        return spec


class Graph:
    """Names and index ranges of the nodes of one model's edge-level graph."""

    def __init__(self, spec: GraphSpec) -> None:
        self.spec = spec
        L, H, G = spec.n_layers, spec.n_heads, spec.kv_heads
        upstream = [naming.INPUT]
        upstream_layer = [-1]
        downstream: list[str] = []
        downstream_layer: list[int] = []
        prefix_len: list[int] = []
        self.head_out_start: list[int] = []  # index of a{L}.h0 among upstream outputs
        self.mlp_out_index: list[int | None] = []
        self.q_in_start: list[int] = []  # index of a{L}.h0<q> among downstream inputs
        self.k_in_start: list[int] = []  # index of a{L}.h0<k> (a{L}.g0<k> when grouped)
        self.v_in_start: list[int] = []  # index of a{L}.h0<v> (a{L}.g0<v> when grouped)
        self.mlp_in_index: list[int | None] = []
        for layer in range(L):
            before_layer = len(upstream)
            for channel, starts in zip(naming.CHANNELS, (self.q_in_start, self.k_in_start, self.v_in_start)):
                starts.append(len(downstream))
                if channel == "q" or not spec.grouped:
                    names = [naming.head_input(layer, h, channel) for h in range(H)]
                else:
                    names = [naming.kv_group_input(layer, group, channel) for group in range(G)]
                downstream += names
                downstream_layer += [layer] * len(names)
                prefix_len += [before_layer] * len(names)
            self.head_out_start.append(len(upstream))
            for h in range(H):
                upstream.append(naming.head(layer, h))
                upstream_layer.append(layer)
            if spec.has_mlps:
                self.mlp_in_index.append(len(downstream))
                downstream.append(naming.mlp(layer))
                downstream_layer.append(layer)
                prefix_len.append(before_layer if spec.parallel_attn_mlp else len(upstream))
                self.mlp_out_index.append(len(upstream))
                upstream.append(naming.mlp(layer))
                upstream_layer.append(layer)
            else:
                self.mlp_in_index.append(None)
                self.mlp_out_index.append(None)
        self.logits_index = len(downstream)
        downstream.append(naming.LOGITS)
        downstream_layer.append(L)
        prefix_len.append(len(upstream))

        self.upstream = upstream
        self.downstream = downstream
        self.upstream_layer = upstream_layer
        self.downstream_layer = downstream_layer
        self.prefix_len = prefix_len
        self.upstream_index = {name: i for i, name in enumerate(upstream)}
        self.downstream_index = {name: i for i, name in enumerate(downstream)}

    # -- sizes -------------------------------------------------------------------------
    @property
    def n_upstream(self) -> int:
        return len(self.upstream)

    @property
    def n_downstream(self) -> int:
        return len(self.downstream)

    @cached_property
    def edge_mask(self) -> torch.Tensor:
        """Bool [n_upstream, n_downstream]: which (u, v) pairs are real edges."""
        u = torch.arange(self.n_upstream, device="cpu")[:, None]
        return u < torch.tensor(self.prefix_len, device="cpu")[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    def layer_inputs(self, layer: int) -> range:
        """Downstream indices of the inputs that live in `layer` (q/k/v of its heads, its MLP)."""
        start = self.q_in_start[layer] if layer < self.spec.n_layers else self.logits_index
        stop = self.q_in_start[layer + 1] if layer + 1 < self.spec.n_layers else self.logits_index
        if layer >= self.spec.n_layers:
            stop = self.logits_index + 1
        return range(start, stop)

    # -- names <-> indices --------------------------------------------------------------
    def edge_name(self, u: int, v: int) -> str:
        return naming.edge(self.upstream[u], self.downstream[v])

    def edge_index(self, name: str) -> tuple[int, int]:
        up, down = naming.parse_edge(name)
        if up not in self.upstream_index or down not in self.downstream_index:
            raise KeyError(name)
        u, v = self.upstream_index[up], self.downstream_index[down]
        if u >= self.prefix_len[v]:
            raise KeyError(name)
        return u, v

    def edge_names(self) -> list[str]:
        """All real edges, in (downstream, upstream) order."""
        return [self.edge_name(u, v) for v in range(self.n_downstream) for u in range(self.prefix_len[v])]

    def edges_to_mask(self, names) -> torch.Tensor:
        mask = torch.zeros(self.n_upstream, self.n_downstream, dtype=torch.bool, device="cpu")
        for name in names:
            mask[self.edge_index(name)] = True
        return mask

    def mask_to_edges(self, mask: torch.Tensor) -> list[str]:
        mask = mask & self.edge_mask
        return [self.edge_name(int(u), int(v)) for u, v in mask.nonzero().tolist()]

    def node_of_input(self, v: int) -> str:
        """The node (without channel) a downstream input belongs to: a head, an MLP, `logits`,
        or for a grouped k/v input its KV group ``a{L}.g{G}`` (read by several heads)."""
        return naming.parse_node(self.downstream[v]).base

    # -- attention channels and grouped-query attention ------------------------------------
    def channel_inputs(self, layer: int, channel: str) -> range:
        """Downstream indices of layer's q inputs (one per head) or k / v inputs (one per KV head)."""
        start = {"q": self.q_in_start, "k": self.k_in_start, "v": self.v_in_start}[channel][layer]
        return range(start, start + (self.spec.n_heads if channel == "q" else self.spec.kv_heads))

    def kv_group_of_head(self, head: int) -> int:
        """The KV group whose keys and values head `head` reads (TransformerLens's repeat_interleave)."""
        return head // (self.spec.n_heads // self.spec.kv_heads)

    def heads_of_kv_group(self, group: int) -> range:
        size = self.spec.n_heads // self.spec.kv_heads
        return range(group * size, (group + 1) * size)

    @cached_property
    def kv_group_members(self) -> dict[str, list[str]]:
        """Grouped graphs: KV group node -> the heads that read its k/v inputs (empty when ungrouped)."""
        if not self.spec.grouped:
            return {}
        return {
            naming.kv_group(layer, group): [naming.head(layer, h) for h in self.heads_of_kv_group(group)]
            for layer in range(self.spec.n_layers)
            for group in range(self.spec.kv_heads)
        }

    def readers_of_input(self, v: int) -> list[str]:
        """The nodes whose computation reads input v (several heads for a grouped k/v input)."""
        node = self.node_of_input(v)
        return self.kv_group_members.get(node, [node])

    def nodes(self) -> list[str]:
        """All nodes: upstream outputs plus logits."""
        return self.upstream + [naming.LOGITS]
