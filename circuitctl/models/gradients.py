"""Gradient passes for integrated-gradient attribution (EAP-IG), beyond `ModelAdapter.input_gradients`.

One `gradient_pass` covers every variant the attribution methods need:

* it starts at any layer from a given residual stream (the interpolated input embeddings of
  EAP-IG-inputs, or the clean residual before the layer whose outputs are interpolated);
* it can hold the summed attention output, the MLP output or the MLP hidden activations
  (``hook_post``) of that first layer at given values (EAP-IG-activations);
* besides the per-head q/k/v, MLP and logits input gradients (in the residual basis, like
  `input_gradients`), it returns the gradient at every MLP's ``hook_post`` (neuron attribution)
  and, for per-position graphs, the key/value input gradients *split by the query position
  group that reads them* (an edge into ``a1.h0@end<k>`` is the key as used by queries at
  ``end``).

The split is exact and architecture-agnostic: a head's key/value input only reaches the metric
through that head's ``hook_z``, so the vector-Jacobian product of ``hook_z`` with the metric's
gradient masked to the query rows of one group is that group's share of the full gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from circuitctl.models.norm_backward import normalisation_input_gradients

from circuitctl.graph import naming

Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Replacement:
    """Outputs of the first layer of a pass held at fixed values (the interpolation points)."""

    attn_heads: torch.Tensor | None = None  # [H, B, P, d] per-head outputs; b_O is added back
    mlp_out: torch.Tensor | None = None  # [B, P, d]
    post: torch.Tensor | None = None  # [B, P, d_mlp] MLP hidden activations (gradient returned)


@dataclass
class LayerGradients:
    """Gradients at the downstream inputs of one layer (or the logits)."""

    inputs: range  # downstream indices, in graph order
    grads: torch.Tensor  # [len(inputs), B, P, d]
    # per query group g (in order): [2H, B, P, d] gradient at the k then v inputs as read by the
    # queries of g; lazy, so only one group's gradients are held at a time
    kv_by_group: Iterator[torch.Tensor] | None = None


@dataclass
class GradientPass:
    logits: torch.Tensor  # [B, vocab] at the answer positions
    layers: Iterator[LayerGradients]  # lazy: the LayerNorm backward runs as it is consumed
    post_grads: dict[int, torch.Tensor]  # layer -> [B, P, d_mlp] gradient at hook_post (if asked)


def gradient_pass(
    adapter,
    resid: torch.Tensor,
    positions: torch.Tensor,
    objective: Objective,
    *,
    start_layer: int = 0,
    replace: Replacement | None = None,
    neurons: bool = False,
    query_groups: torch.Tensor | None = None,
    n_groups: int = 0,
    first_input: int = 0,
) -> GradientPass:
    """Run the model from `start_layer` on `resid` and differentiate `objective` of the logits.

    resid:        [B, P, d] residual stream entering `start_layer` (the input embeddings when 0).
    replace:      outputs of `start_layer` held fixed (their inputs then get no gradient).
    neurons:      also return the gradient at every MLP's hook_post from `start_layer` on.
    query_groups: [B, P] position-group index of each query (-1: none); with `n_groups` > 0 the
                  key/value input gradients are also returned split by query group.
    first_input:  downstream inputs before this index are not needed (their layers are skipped).
    """
    model, g, cfg = adapter.model, adapter.graph, adapter.cfg
    L, H = cfg.n_layers, cfg.n_heads
    has_mlps = g.spec.has_mlps
    split = query_groups is not None and n_groups > 0
    replace = replace or Replacement()
    acts: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        acts[hook.name] = x
        return x

    def replace_attn(x, hook):
        out = replace.attn_heads.sum(0) + model.blocks[start_layer].attn.b_O
        return out.to(x.dtype)

    def replace_mlp(x, hook):
        return replace.mlp_out.to(x.dtype)

    def replace_post(x, hook):
        leaf = replace.post.detach().to(x.dtype).requires_grad_(True)
        acts[hook.name] = leaf
        return leaf

    hooks = []
    for i in range(start_layer, L):
        attn_live = not (i == start_layer and replace.attn_heads is not None)
        hooks.append((f"blocks.{i}.hook_resid_pre", keep))
        if attn_live:
            hooks += [(f"blocks.{i}.attn.hook_{c}", keep) for c in naming.CHANNELS]
            if split:
                hooks.append((f"blocks.{i}.attn.hook_z", keep))
        else:
            hooks.append((f"blocks.{i}.hook_attn_out", replace_attn))
        if has_mlps:
            hooks.append((f"blocks.{i}.hook_mlp_in", keep))
            if i == start_layer and replace.mlp_out is not None:
                hooks.append((f"blocks.{i}.hook_mlp_out", replace_mlp))
            elif i == start_layer and replace.post is not None:
                hooks.append((f"blocks.{i}.mlp.hook_post", replace_post))
            elif neurons:
                hooks.append((f"blocks.{i}.mlp.hook_post", keep))

    resid0 = resid.detach().requires_grad_(True)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        x = resid0
        for block in model.blocks[start_layer:]:
            x = block(x)
        final = x
        logits = adapter.unembed_at(final, positions)
        value = objective(logits)

    names: list[str] = []
    for i in range(start_layer, L):
        if f"blocks.{i}.attn.hook_q" in acts:
            names += [f"blocks.{i}.attn.hook_{c}" for c in naming.CHANNELS]
            if split:
                names.append(f"blocks.{i}.attn.hook_z")
        if has_mlps:
            names.append(f"blocks.{i}.hook_mlp_in")
            if f"blocks.{i}.mlp.hook_post" in acts:
                names.append(f"blocks.{i}.mlp.hook_post")
    tensors = [acts[n] for n in names] + [final]
    grads = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=split)
    grad_of = dict(zip(names + ["final"], grads))

    def grad_or_zeros(name: str, like: torch.Tensor) -> torch.Tensor:
        gr = grad_of.get(name)
        return torch.zeros_like(like) if gr is None else gr

    post_grads = {}
    if neurons or replace.post is not None:
        for i in range(start_layer, L):
            name = f"blocks.{i}.mlp.hook_post"
            if name in acts:
                post_grads[i] = grad_or_zeros(name, acts[name]).detach()

    def to_residual_basis(layer: int, per_channel: list[torch.Tensor], channels: str) -> torch.Tensor:
        """[B, P, n, d_head] gradients at hook_q/k/v -> [sum of n, B, P, d] at the residual stream
        (n = n_heads for q; for k / v of grouped-query attention, n_kv_heads and the shared weights)."""
        cot = torch.cat(
            [torch.einsum("bphe,hde->hbpd", gr, adapter.projection(layer, c)[0]) for gr, c in zip(per_channel, channels)]
        )
        # LayerNorm's backward is linear in the incoming gradient given the forward statistics:
        # one vectorised vjp covers every head and channel.
        return normalisation_input_gradients(model.blocks[layer].ln1, acts[f"blocks.{layer}.hook_resid_pre"].detach(), cot)

    def kv_split(layer: int) -> Iterator[torch.Tensor]:
        z = acts[f"blocks.{layer}.attn.hook_z"]
        k, v = acts[f"blocks.{layer}.attn.hook_k"], acts[f"blocks.{layer}.attn.hook_v"]
        gz = grad_or_zeros(f"blocks.{layer}.attn.hook_z", z)
        for group in range(n_groups):
            rows = (query_groups == group).to(gz.dtype)[:, :, None, None]
            gk, gv = torch.autograd.grad(z, [k, v], grad_outputs=gz * rows, retain_graph=True, allow_unused=True)
            gk = torch.zeros_like(k) if gk is None else gk
            gv = torch.zeros_like(v) if gv is None else gv
            yield to_residual_basis(layer, [gk, gv], "kv")  # [2 x KV heads, B, P, d]

    def per_layer() -> Iterator[LayerGradients]:
        for i in range(start_layer, L):
            heads_needed = g.q_in_start[i] + 3 * H > first_input
            mlp_needed = has_mlps and g.mlp_in_index[i] >= first_input
            if f"blocks.{i}.attn.hook_q" in acts and heads_needed:
                qkv = [grad_or_zeros(f"blocks.{i}.attn.hook_{c}", acts[f"blocks.{i}.attn.hook_{c}"]) for c in naming.CHANNELS]
                head_grads = to_residual_basis(i, qkv, "qkv")
                split_grads = kv_split(i) if split else None
                if has_mlps:
                    gm = grad_or_zeros(f"blocks.{i}.hook_mlp_in", acts[f"blocks.{i}.hook_mlp_in"])
                    yield LayerGradients(g.layer_inputs(i), torch.cat([head_grads, gm[None]]), split_grads)
                else:
                    yield LayerGradients(g.layer_inputs(i), head_grads, split_grads)
            elif mlp_needed:
                v = g.mlp_in_index[i]
                gm = grad_or_zeros(f"blocks.{i}.hook_mlp_in", acts[f"blocks.{i}.hook_mlp_in"])
                yield LayerGradients(range(v, v + 1), gm[None])
        gf = grad_or_zeros("final", final)
        yield LayerGradients(range(g.logits_index, g.logits_index + 1), gf[None])

    return GradientPass(logits.detach(), per_layer(), post_grads)


def neuron_activations(adapter, tokens: torch.Tensor) -> torch.Tensor:
    """[L, B, P, d_mlp] MLP hidden activations (hook_post) of a plain forward pass."""
    model, L = adapter.model, adapter.cfg.n_layers
    kept: list[torch.Tensor] = []

    def keep(x, hook):
        kept.append(x)

    hooks = [(f"blocks.{i}.mlp.hook_post", keep) for i in range(L)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        resid = adapter.embed(tokens)
        for block in model.blocks:
            resid = block(resid)
    return torch.stack(kept)
