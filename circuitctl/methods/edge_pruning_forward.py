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
    diffs: list[torch.Tensor] = []  # per upstream node, in graph order: current - ablated output [n, B, P, d]
    resid_pre: dict[int, torch.Tensor] = {}
    B, P = tokens.shape

    def mixed(inputs: range) -> torch.Tensor:
        """sum_u drop[u, v] * diff_u for the downstream inputs `inputs`: [len(inputs), B, P, d]."""
        n_up = max(g.prefix_len[v] for v in inputs)
        upstream = torch.cat(diffs)[:n_up]
        weights = drop[:n_up, inputs.start : inputs.stop]
        return (weights.T @ upstream.flatten(1)).view(len(inputs), B, P, -1)

    def keep_resid(x, hook):
        resid_pre[hook.layer()] = x

    def project(channel: str):
        def hook_fn(x, hook):
            layer = hook.layer()
            inputs = resid_pre[layer][None] - mixed(g.channel_inputs(layer, channel))  # [H or n_kv, B, P, d]
            W, b = adapter._projection(layer, channel)
            return torch.einsum("hbpd,hde->bphe", adapter.model.blocks[layer].ln1(inputs), W) + b

        return hook_fn

    def keep_heads(z, hook):
        layer = hook.layer()
        lo = g.head_out_start[layer]
        diffs.append(adapter._head_outputs(layer, z) - ablation_outputs[lo : lo + H])

    def mix_mlp_in(x, hook):
        v = g.mlp_in_index[hook.layer()]
        return x - mixed(range(v, v + 1))[0]

    def keep_mlp(x, hook):
        u = g.mlp_out_index[hook.layer()]
        diffs.append((x - ablation_outputs[u])[None])

    hooks = []
    for i in range(L):
        hooks += [(f"blocks.{i}.hook_resid_pre", keep_resid), (f"blocks.{i}.attn.hook_z", keep_heads)]
        hooks += [(f"blocks.{i}.attn.hook_{c}", project(c)) for c in naming.CHANNELS]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_in", mix_mlp_in), (f"blocks.{i}.hook_mlp_out", keep_mlp)]
    with model.hooks(fwd_hooks=hooks):
        resid = adapter.embed(tokens)
        diffs.append((resid - ablation_outputs[0])[None])
        for block in model.blocks:
            resid = block(resid)
        resid = resid - mixed(range(g.logits_index, g.logits_index + 1))[0]
        return adapter._unembed_at(resid, positions)


def node_keep(graph, node_mask: torch.Tensor) -> torch.Tensor:
    """An edge mask [U, V] from a node mask [U]: every edge out of node u weighs node_mask[u]."""
    return node_mask[:, None].expand(graph.n_upstream, graph.n_downstream)
