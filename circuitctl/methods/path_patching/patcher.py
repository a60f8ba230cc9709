"""Positional path patching: recomputing single (node, position) pairs of a circuit.

Vocabulary. A *slot* is a named token position of the task (a label such as ``S1`` or
``end``, or an index), given per example as an index tensor ``[S, B]``. A positional node
is ``(node, slot)`` where ``node`` is an upstream index of :class:`Graph` (``input``, a head,
an MLP) or ``graph.n_upstream`` for ``logits``; upstream order is topological, so sorting
node ids sorts a circuit from the input to the logits. A :class:`PathEdge` runs from a
sender's output at its slot into one input of a receiver (a downstream index: a head's q, k
or v, an MLP, the logits) as read by the receiver at *its* slot. A q, MLP or logits input
is read at the receiver's own position; a head's keys and values are read at every
position up to the query, so their senders may sit at earlier slots.

A path patch runs the clean prompt with every node frozen at its clean value except the
circuit nodes downstream of the patched sources: each of those is recomputed from its clean
inputs plus the changes carried by its circuit edges (and the patched source, if it targets
that node). So the effect of a new path is measured through the receiver's already-found
downstream paths only. K sources are computed together, as K copies of the batch.

Why the recomputation is written out (LayerNorm, q/k/v projections, rotary, one attention
row, the MLP) instead of hooking a TransformerLens forward pass: a positional node needs its
own copy of a head's keys and values (``a1.h0@end`` and ``a1.h0@S2`` read different circuit
edges into the same key positions), which one forward pass cannot hold, and only the few
circuit nodes need recomputing, not whole layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from circuitctl.errors import UsageError
from circuitctl.models.adapter import Capture, ModelAdapter


@dataclass(frozen=True, order=True)
class PathEdge:
    """The direct path from `sender` at `sender_slot` into input `receiver_input` at `receiver_slot`."""

    sender: int  # upstream index
    sender_slot: int
    receiver_input: int  # downstream index (a head's q/k/v input, an MLP input, the logits)
    receiver_slot: int


@dataclass(frozen=True, order=True)
class NodePatch:
    """Every output of `node` at `slot` takes its ablation value (for the logits node: its whole input)."""

    node: int
    slot: int


Source = Union[PathEdge, NodePatch]

_OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def check_supported(adapter: ModelAdapter) -> None:
    """Raise a UsageError for attention variants the recomputation does not implement."""
    cfg = adapter.cfg
    problems = []
    if cfg.positional_embedding_type in ("alibi", "relative_positional_bias"):
        problems.append(f"positional_embedding_type '{cfg.positional_embedding_type}'")
    for flag in ("use_qk_norm", "use_attention_sinks", "use_logn_attn", "load_in_4bit"):
        if getattr(cfg, flag, False):
            problems.append(flag)
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("clip_qkv")
    if getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts MLPs")
    if cfg.original_architecture in _OLMO_QK_NORM:
        problems.append(f"architecture {cfg.original_architecture} (q/k norm)")
    if getattr(cfg, "attention_dir", "causal") != "causal":
        problems.append("bidirectional attention")
    if problems:
        raise UsageError("method 'path_patching' does not support this model: " + ", ".join(problems))


def node_of_inputs(adapter: ModelAdapter) -> list[int]:
    """For every downstream input, the node id it belongs to (`n_upstream` for the logits)."""
    g = adapter.graph
    return [g.n_upstream if v == g.logits_index else g.upstream_index[g.node_of_input(v)] for v in range(g.n_downstream)]


class PathPatcher:
    """Path-patched logits for one batch of prompts (K sources at a time)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        clean: Capture,
        ablation_outputs: torch.Tensor,
        slot_index: torch.Tensor,
        answer_slot: int,
    ) -> None:
        self.adapter = adapter
        self.model = adapter.model
        self.graph = adapter.graph
        self.clean = clean
        _, B, P, _ = clean.outputs.shape
        self.ablation = ablation_outputs.expand(-1, B, -1, -1)
        self.slot_index = slot_index.to(clean.outputs.device)
        self.answer_slot = answer_slot
        self.rows = torch.arange(B, device=clean.outputs.device)
        self.node_of_input = node_of_inputs(adapter)
        self.logits_node = self.graph.n_upstream
        self._qkv: dict[int, torch.Tensor] = {}  # layer -> clean pre-rotary q, k, v [3, B, P, H, d_head]
        self._clean_out: dict[tuple[int, int], torch.Tensor] = {}  # (node, slot) -> recomputed clean output [B, d]
        self._mlp_in: dict[int, torch.Tensor] = {}  # layer -> clean MLP input [B, P, d]

    # -- sources --------------------------------------------------------------------------
    def source_delta(self, node: int, slot: int) -> torch.Tensor:
        """[B, d] ablation minus clean output of `node` at `slot` (logits: summed over every upstream node)."""
        idx = self.slot_index[slot]
        if node == self.logits_node:
            diff = self.ablation - self.clean.outputs  # [U, B, P, d]
            return diff[:, self.rows, idx].sum(0)
        return self.ablation[node][self.rows, idx] - self.clean.outputs[node][self.rows, idx]

    def changed_outputs(self) -> torch.Tensor:
        """Bool [U, S]: whether a node's output at a slot differs between clean and ablation in some example.

        A path from an unchanged output patches nothing: its effect is exactly 0."""
        diff = (self.ablation - self.clean.outputs)[:, self.rows[None, :], self.slot_index]  # [U, S, B, d]
        return (diff != 0).flatten(2).any(-1)

    def _source_deltas(self, sources: Sequence[Source], K: int):
        """Group edge sources by (receiver node, slot) -> {input: {sender slot: [K, B, d]}}."""
        d_model = self.clean.outputs.shape[-1]
        B = self.rows.shape[0]
        injected: dict[tuple[int, int], dict[int, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
        overridden: dict[tuple[int, int], list[int]] = defaultdict(list)
        for k, source in enumerate(sources):
            if isinstance(source, NodePatch):
                overridden[(source.node, source.slot)].append(k)
                continue
            key = (self.node_of_input[source.receiver_input], source.receiver_slot)
            per_slot = injected[key][source.receiver_input]
            if source.sender_slot not in per_slot:
                per_slot[source.sender_slot] = self.clean.outputs.new_zeros(K, B, d_model)
            per_slot[source.sender_slot][k] += self.source_delta(source.sender, source.sender_slot)
        return injected, overridden

    # -- the patched run ------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, circuit: Sequence[PathEdge], sources: Sequence[Source]) -> torch.Tensor:
        """[K, B, vocab] logits at the answer positions, one copy per source.

        Copy k patches source k (a path or a whole node) and propagates the change through
        `circuit`'s edges only; every other node keeps its clean output.
        """
        K = len(sources)
        into: dict[tuple[int, int], list[PathEdge]] = defaultdict(list)
        successors: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
        for edge in circuit:
            receiver = (self.node_of_input[edge.receiver_input], edge.receiver_slot)
            into[receiver].append(edge)
            successors[(edge.sender, edge.sender_slot)].add(receiver)
        injected, overridden = self._source_deltas(sources, K)

        reached = set(injected) | set(overridden)
        todo = list(reached)
        while todo:
            for nxt in successors.get(todo.pop(), ()):
                if nxt not in reached:
                    reached.add(nxt)
                    todo.append(nxt)

        delta_out: dict[tuple[int, int], torch.Tensor] = {}
        final_delta = None
        for key in sorted(reached):  # node ids are topological
            inputs: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
            for v, per_slot in injected.get(key, {}).items():
                for slot, delta in per_slot.items():
                    inputs[v][slot] = delta
            for edge in into.get(key, ()):
                delta = delta_out.get((edge.sender, edge.sender_slot))
                if delta is not None:
                    current = inputs[edge.receiver_input].get(edge.sender_slot)
                    inputs[edge.receiver_input][edge.sender_slot] = delta if current is None else current + delta
            node, slot = key
            if node == self.logits_node:
                out = sum((d for per_slot in inputs.values() for d in per_slot.values()), start=self._zeros(K))
            else:
                out = self._recompute(node, slot, inputs, K) if inputs else self._zeros(K)
            for k in overridden.get(key, ()):
                out[k] = self.source_delta(node, slot)
            if node == self.logits_node:
                if slot == self.answer_slot:
                    final_delta = out
            else:
                delta_out[key] = out
        return self._unembed(self._zeros(K) if final_delta is None else final_delta)

    def _zeros(self, K: int) -> torch.Tensor:
        return self.clean.outputs.new_zeros(K, self.rows.shape[0], self.clean.outputs.shape[-1])

    def _unembed(self, delta: torch.Tensor) -> torch.Tensor:
        K, B, d = delta.shape
        idx = self.slot_index[self.answer_slot]
        final = (self.clean.resid[-1][self.rows, idx] + delta).reshape(K * B, 1, d)
        if hasattr(self.model, "ln_final"):  # models without normalization have none
            final = self.model.ln_final(final)
        return self.model.unembed(final)[:, 0].reshape(K, B, -1)

    def _recompute(self, node: int, slot: int, inputs: dict[int, dict[int, torch.Tensor]], K: int) -> torch.Tensor:
        """[K, B, d] change of `node`'s output at `slot` given its input changes."""
        g, H = self.graph, self.adapter.cfg.n_heads
        layer = g.upstream_layer[node]
        if g.mlp_out_index[layer] == node:
            (per_slot,) = inputs.values()
            delta = sum(per_slot.values())
            return self._mlp(layer, slot, delta) - self._clean(node, slot)
        h = node - g.head_out_start[layer]
        channels = [inputs.get(g.q_in_start[layer] + c * H + h) for c in range(3)]
        return self._head(layer, h, slot, channels, K) - self._clean(node, slot)

    def _clean(self, node: int, slot: int) -> torch.Tensor:
        """The clean output as this module computes it, so that an unchanged input gives a change of exactly 0."""
        key = (node, slot)
        if key not in self._clean_out:
            g = self.graph
            layer = g.upstream_layer[node]
            if g.mlp_out_index[layer] == node:
                out = self._mlp(layer, slot, self._zeros(1))
            else:
                out = self._head(layer, node - g.head_out_start[layer], slot, [None, None, None], 1)
            self._clean_out[key] = out[0]
        return self._clean_out[key]

    # -- components ---------------------------------------------------------------------
    def _clean_qkv(self, layer: int) -> torch.Tensor:
        if layer not in self._qkv:
            attn = self.model.blocks[layer].attn
            normed = self.model.blocks[layer].ln1(self.clean.resid[layer])
            weights = ((attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V))
            self._qkv[layer] = torch.stack([torch.einsum("bpd,hde->bphe", normed, W) + b for W, b in weights])
        return self._qkv[layer]

    def _project(self, layer: int, h: int, channel: int, deltas: dict[int, torch.Tensor] | None, K: int) -> torch.Tensor:
        """[K, B, P, d_head] pre-rotary q, k or v of head h with input changes {slot: [K, B, d]}.

        Slots are distinct tokens in every example (`PositionLayout.from_data` checks it), so each changed
        row is recomputed on its own from the clean residual plus its change."""
        clean = self._clean_qkv(layer)[channel, :, :, h]  # [B, P, d_head]
        if not deltas:
            return clean[None].expand(K, -1, -1, -1)
        block = self.model.blocks[layer]
        attn = block.attn
        W, b = [(attn.W_Q, attn.b_Q), (attn.W_K, attn.b_K), (attn.W_V, attn.b_V)][channel]
        full = clean[None].repeat(K, 1, 1, 1)
        for slot, delta in deltas.items():
            idx = self.slot_index[slot]
            normed = block.ln1(self.clean.resid[layer][self.rows, idx] + delta)  # [K, B, d]
            full[:, self.rows, idx] = normed @ W[h] + b[h]
        return full

    def _head(self, layer: int, h: int, slot: int, channels: list, K: int) -> torch.Tensor:
        """[K, B, d] output of head h at the query position `slot` (without b_O)."""
        cfg = self.adapter.cfg
        attn = self.model.blocks[layer].attn
        q, k, v = (self._project(layer, h, c, channels[c], K) for c in range(3))
        _, B, P, e = q.shape
        if cfg.positional_embedding_type == "rotary":
            q, k = (attn.apply_rotary(x.reshape(K * B, P, 1, e)).reshape(K, B, P, e) for x in (q, k))
        qi = self.slot_index[slot]
        scores = torch.einsum("kbe,kbpe->kbp", q[:, self.rows, qi], k) / attn.attn_scale
        cap = getattr(cfg, "attn_scores_soft_cap", -1.0)
        if cap is not None and cap > 0:
            scores = cap * torch.tanh(scores / cap)
        keys = torch.arange(P, device=qi.device)
        allowed = keys[None, :] <= qi[:, None]
        if getattr(attn, "attn_type", "global") == "local":
            allowed = allowed & (keys[None, :] > qi[:, None] - cfg.window_size)
        pattern = scores.masked_fill(~allowed[None], float("-inf")).softmax(-1)
        z = torch.einsum("kbp,kbpe->kbe", pattern, v)
        return z @ attn.W_O[h]

    def _mlp_input(self, layer: int) -> torch.Tensor:
        """[B, P, d] the MLP's clean input: the residual after attention (before it, when parallel)."""
        if layer not in self._mlp_in:
            resid = self.clean.resid[layer]
            if not self.graph.spec.parallel_attn_mlp:
                start, H = self.graph.head_out_start[layer], self.adapter.cfg.n_heads
                resid = resid + self.clean.outputs[start : start + H].sum(0) + self.model.blocks[layer].attn.b_O
            self._mlp_in[layer] = resid
        return self._mlp_in[layer]

    def _mlp(self, layer: int, slot: int, delta: torch.Tensor) -> torch.Tensor:
        K, B, d = delta.shape
        block = self.model.blocks[layer]
        x = self._mlp_input(layer)[self.rows, self.slot_index[slot]] + delta
        return block.mlp(block.ln2(x.reshape(K * B, 1, d)))[:, 0].reshape(K, B, d)
