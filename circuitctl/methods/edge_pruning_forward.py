"""The differentiable masked forward pass of edge pruning and subnetwork probing.

With a continuous mask ``keep`` in [0, 1] over the edge graph (``[n_upstream, n_downstream]``),
every downstream input (a head's q, k or v input, an MLP input, the logits) is

    input_v = current input_v - sum_u (1 - keep[u, v]) * (current output_u - ablated output_u),

i.e. z * (the writer's output in this pass) + (1 - z) * (its ablated output), summed over the
writers, plus the biases. "Current" means recomputed in this same pass: once some mask is below
1, the outputs of every later node change, so nothing after the embedding can come from a
cached clean run. Each layer's inputs are mixed in one matrix product (all edges into a layer
at once, ``[V_layer, n_up] @ [n_up, B*P*d]``), not one hook per edge, and the gradient with
respect to ``keep`` flows through autograd. At binary masks this is exactly edge patching
(`ModelAdapter.patched_logits`); tested against it.

This module is the TransformerLens side of the learned-mask methods: like
`ModelAdapter.patched_logits` it re-projects a head's mixed q/k/v input inside ``hook_q/k/v``
(no ``use_split_qkv_input`` copies of the residual stream) and reads each head's output from
``hook_z`` (``z @ W_O[h]``, no ``use_attn_result``).
"""

from __future__ import annotations

import torch

from circuitctl.graph import naming
from circuitctl.models.adapter import ModelAdapter


class _Writers:
    """Every writer's (current - ablated) output of one masked pass, in graph order, also copied
    into one contiguous buffer ``[n_upstream, B*P*d]`` as it is produced, so that mixing the first
    n writers into a layer's inputs is one matrix product over ``buffer[:n]`` (no concatenation per
    layer, forward or backward)."""

    def __init__(self, n_upstream: int, like: torch.Tensor) -> None:
        self.blocks: list[torch.Tensor] = []
        self.buffer = torch.empty((n_upstream, like[0].numel()), dtype=like.dtype, device=like.device)
        self.rows = 0

    def append(self, block: torch.Tensor) -> None:
        with torch.no_grad():
            self.buffer[self.rows : self.rows + block.shape[0]] = block.reshape(block.shape[0], -1)
        self.blocks.append(block)
        self.rows += block.shape[0]

    def upto(self, n_up: int) -> list[torch.Tensor]:
        used, rows = [], 0
        for block in self.blocks:
            if rows >= n_up:
                break
            used.append(block)
            rows += block.shape[0]
        assert rows == n_up, "writer blocks must end at a reader's prefix"
        return used


class _Mix(torch.autograd.Function):
    """weights^T @ buffer[:n] for the writers' blocks (autograd inputs) whose values the buffer holds."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, buffer: torch.Tensor, *blocks: torch.Tensor) -> torch.Tensor:
        # only the detached buffer and the shapes are kept: holding the blocks (graph tensors) on
        # ctx would make a reference cycle through the graph that outlives the step
        n = weights.shape[0]
        ctx.buffer, ctx.shapes = buffer, [b.shape for b in blocks]
        ctx.save_for_backward(weights)
        return weights.T @ buffer[:n]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weights,) = ctx.saved_tensors
        n = weights.shape[0]
        grad_weights = ctx.buffer[:n] @ grad.T if ctx.needs_input_grad[0] else None
        grad_rows = weights @ grad
        sizes = [shape[0] for shape in ctx.shapes]
        grad_blocks = [g.view(shape) for g, shape in zip(grad_rows.split(sizes), ctx.shapes)]
        return (grad_weights, None, *grad_blocks)


def _normalize(ln, x: torch.Tensor) -> torch.Tensor:
    """`ln(x)` for a TransformerLens LayerNorm / LayerNormPre in one fused kernel (the per-head
    copies make LayerNorm a large share of the pass); other normalisations through the module."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    if isinstance(ln, LayerNorm):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), ln.w, ln.b, ln.eps)
    if isinstance(ln, LayerNormPre):
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, ln.eps)
    return ln(x)


def masked_logits(
    adapter: ModelAdapter,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    ablation_outputs: torch.Tensor,
    keep: torch.Tensor,
) -> torch.Tensor:
    """Logits at the answer positions [B, vocab] of the clean `tokens` run with each edge u -> v
    kept with weight ``keep[u, v]`` (1: clean, 0: ablated, in between: the mix).

    ablation_outputs: [n_upstream, B or 1, P, d] what an ablated edge carries (the engine's
                      resample / zero / mean outputs).
    keep:             float [n_upstream, n_downstream]; entries that are not edges are ignored.
    Differentiable with respect to `keep` (run it under ``torch.enable_grad()``).
    """
    g, model, L, H = adapter.graph, adapter.model, adapter.cfg.n_layers, adapter.cfg.n_heads
    drop = (1 - keep.to(adapter.dtype)) * g.edge_mask.to(keep.device, adapter.dtype)  # weight of the ablated value
    resid_pre: dict[int, torch.Tensor] = {}
    layer_mix: dict[int, list[torch.Tensor]] = {}  # layer -> [q, k, v, MLP-prefix] mixes
    B, P = tokens.shape
    n_kv = g.spec.kv_heads

    def mix(columns: range, n_up: int) -> torch.Tensor:
        """sum_u drop[u, v] * diff_u for the downstream inputs `columns` over the first n_up writers."""
        weights = drop[:n_up, columns.start : columns.stop]
        return _Mix.apply(weights, writers.buffer, *writers.upto(n_up)).view(len(columns), B, P, -1)

    def keep_resid(x, hook):
        resid_pre[hook.layer()] = x

    def project(channel: str):
        def hook_fn(x, hook):
            layer = hook.layer()
            if layer not in layer_mix:  # q, k, v (and the MLP's earlier writers) in one product
                sizes = [H, n_kv, n_kv] + ([1] if g.spec.has_mlps else [])
                layer_mix[layer] = list(mix(g.layer_inputs(layer), g.head_out_start[layer]).split(sizes))
            part = layer_mix[layer][naming.CHANNELS.index(channel)]
            W, b = adapter.projection(layer, channel)
            normed = _normalize(model.blocks[layer].ln1, resid_pre[layer][None] - part)
            return torch.einsum("hbpd,hde->bphe", normed, W) + b

        return hook_fn

    def keep_heads(z, hook):
        layer = hook.layer()
        lo = g.head_out_start[layer]
        writers.append(adapter.head_outputs(layer, z) - ablation_outputs[lo : lo + H])

    def mix_mlp_in(x, hook):
        layer = hook.layer()
        v = g.mlp_in_index[layer]
        mixed = layer_mix.pop(layer)[-1][0]
        if g.prefix_len[v] > g.head_out_start[layer]:  # sequential blocks: the MLP also reads its layer's heads
            heads = writers.blocks[-1]
            mixed = mixed + torch.einsum("h,hbpd->bpd", drop[g.head_out_start[layer] : g.prefix_len[v], v], heads)
        return x - mixed

    def keep_mlp(x, hook):
        u = g.mlp_out_index[hook.layer()]
        writers.append((x - ablation_outputs[u])[None])

    hooks = []
    for i in range(L):
        hooks += [(f"blocks.{i}.hook_resid_pre", keep_resid), (f"blocks.{i}.attn.hook_z", keep_heads)]
        hooks += [(f"blocks.{i}.attn.hook_{c}", project(c)) for c in naming.CHANNELS]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_in", mix_mlp_in), (f"blocks.{i}.hook_mlp_out", keep_mlp)]
    with model.hooks(fwd_hooks=hooks):
        resid = adapter.embed(tokens)
        writers = _Writers(g.n_upstream, resid[None])
        writers.append((resid - ablation_outputs[0])[None])
        for block in model.blocks:
            resid = block(resid)
        resid = resid - mix(range(g.logits_index, g.logits_index + 1), g.n_upstream)[0]
        return adapter.unembed_at(resid, positions)


def node_keep(graph, node_mask: torch.Tensor) -> torch.Tensor:
    """An edge mask [U, V] from a node mask [U]: every edge out of node u weighs node_mask[u]."""
    return node_mask[:, None].expand(graph.n_upstream, graph.n_downstream)
