"""Patched forward passes for neuron circuits and per-position edge circuits.

Both batch K circuits along the example axis and start at the first layer an ablation touches,
from the clean run's cached residual stream (like `ModelAdapter.patched_logits`).

* `neuron_patched_logits`: chosen MLP neurons (``hook_post``) carry their ablation values.
* `positional_patched_logits`: edges are ablated per position group. An edge into a head's
  key or value is ablated only for the queries of its destination group, so the layer is run
  once per query group ("copies" along the batch axis, which differ only in their key/value
  inputs) and each query row of ``hook_z`` is taken from its own group's copy; every other
  computation is position-wise, so the copies stay identical outside the attention.
"""

from __future__ import annotations

import torch

from circuitctl.graph import naming


def neuron_patched_logits(
    adapter,
    clean,
    ablation_post: torch.Tensor,
    ablated: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits [K, B, vocab] with the neurons ablated[k] (bool [K, L, d_mlp]) at their ablation values.

    clean:         the clean run's Capture; ablation_post: [L, B or 1, P, d_mlp].
    """
    model = adapter.model
    K, B = ablated.shape[0], clean.resid.shape[1]
    touched = ablated.any(dim=(0, 2)).nonzero().flatten().tolist()
    if not touched:
        return clean.logits[None].expand(K, -1, -1).clone()
    start = min(touched)
    weights = ablated.to(adapter.dtype)

    def patch_post(x, hook):
        layer = hook.layer()
        w = weights[:, layer][:, None, None, :]  # [K, 1, 1, n]
        x = x.unflatten(0, (K, B))
        return (x + w * (ablation_post[layer][None] - x)).flatten(0, 1)

    hooks = [(f"blocks.{i}.mlp.hook_post", patch_post) for i in touched]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        resid = clean.resid[start].repeat(K, 1, 1)
        for block in model.blocks[start:]:
            resid = block(resid)
        logits = adapter.unembed_at(resid, positions.repeat(K))
    return logits.unflatten(0, (K, B))


def positional_patched_logits(
    adapter,
    clean,
    ablation_outputs: torch.Tensor,
    ablated: torch.Tensor,
    groups: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Logits [K, B, vocab] with per-position edges ablated.

    ablated: bool [K, G_src, G_dst, U, V] (only real per-position edges, see PositionalGraph.edge_mask).
    groups:  [B, P] position group of every token (-1: padding).
    """
    model, g, cfg = adapter.model, adapter.graph, adapter.cfg
    L, H = cfg.n_layers, cfg.n_heads
    K, G = ablated.shape[0], ablated.shape[1]
    B = clean.resid.shape[1]
    touched_inputs = ablated.any(dim=(0, 1, 2, 3)).nonzero().flatten().tolist()
    start = min((g.downstream_layer[v] for v in touched_inputs), default=L)
    if start == L and not touched_inputs:
        return clean.logits[None].expand(K, -1, -1).clone()
    n_static = g.head_out_start[start] if start < L else g.n_upstream
    weights = ablated.to(adapter.dtype)
    in_group = [(groups == grp).to(adapter.dtype)[None, :, :, None] for grp in range(G)]  # [1, B, P, 1]
    static_diff = clean.outputs[:n_static] - ablation_outputs[:n_static]  # [n, B, P, d]
    dynamic: list[torch.Tensor] = []  # [n, K, B, P, d] diffs of nodes recomputed in this run

    def contribution(sl: slice, src: int, dst: int) -> torch.Tensor | None:
        """sum_u W[k, src, dst, u, v] * diff_u at the tokens of group src: [V, K, B, P, d]."""
        w = weights[:, src, dst, :, sl]
        if not bool(w.any()):
            return None
        mask = in_group[src]
        out = torch.einsum("ubpd,kuv->vkbpd", static_diff * mask, w[:, :n_static])
        if dynamic:
            dyn = torch.cat(dynamic)
            out = out + torch.einsum("ukbpd,kuv->vkbpd", dyn * mask[:, None], w[:, n_static : n_static + dyn.shape[0]])
        return out

    def same_position(inputs: range) -> torch.Tensor | None:
        """Delta at each token from the edges of its own group: [V, K, B, P, d]."""
        sl = slice(inputs.start, inputs.stop)
        parts = [c for grp in range(G) if (c := contribution(sl, grp, grp)) is not None]
        return sum(parts) if parts else None

    def per_query_group(inputs: range) -> torch.Tensor | None:
        """Delta as seen by the queries of each group: [V, K, G, B, P, d]."""
        sl = slice(inputs.start, inputs.stop)
        if not bool(weights[..., sl].any()):
            return None
        copies = []
        for dst in range(G):
            parts = [c for src in range(G) if (c := contribution(sl, src, dst)) is not None]
            copies.append(sum(parts) if parts else torch.zeros_like(static_diff[:1, None]).expand(sl.stop - sl.start, K, -1, -1, -1))
        return torch.stack(copies, dim=2)

    def to_copies(d: torch.Tensor) -> torch.Tensor:
        """[V, K, B, P, d] -> [V, K*G*B, P, d], identical in every copy."""
        return d[:, :, None].expand(-1, -1, G, -1, -1, -1).flatten(1, 3)

    current_resid: dict[int, torch.Tensor] = {}

    def keep_resid(x, hook):
        current_resid[hook.layer()] = x

    def patch_channel(channel: int):
        name = naming.CHANNELS[channel]

        def hook_fn(x, hook):
            layer = hook.layer()
            first = g.q_in_start[layer] + channel * H
            inputs = range(first, first + H)
            if name == "q":
                d = same_position(inputs)
                d = None if d is None else to_copies(d)
            else:
                d = per_query_group(inputs)
                d = None if d is None else d.flatten(1, 3)
            if d is None:
                return x
            attn = model.blocks[layer].attn
            normed = model.blocks[layer].ln1(current_resid[layer][None] - d)
            W, b = getattr(attn, f"W_{name.upper()}"), getattr(attn, f"b_{name.upper()}")
            return torch.einsum("hbpd,hde->bphe", normed, W) + b

        return hook_fn

    index = groups.clamp(min=0)[None, None, :, :, None, None]  # which copy answers each query row

    def merge_z(z, hook):
        layer = hook.layer()
        per_copy = z.unflatten(0, (K, G, B))
        merged = per_copy.gather(1, index.expand(K, 1, B, -1, z.shape[-2], z.shape[-1]))[:, 0]  # [K, B, P, H, e]
        out = adapter.head_outputs(layer, merged.flatten(0, 1)).unflatten(1, (K, B))
        lo = g.head_out_start[layer]
        dynamic.append(out - ablation_outputs[lo : lo + H][:, None])
        return merged[:, None].expand(K, G, B, *merged.shape[2:]).flatten(0, 2)

    def patch_mlp_in(x, hook):
        v = g.mlp_in_index[hook.layer()]
        d = same_position(range(v, v + 1))
        return x if d is None else x - to_copies(d)[0]

    def keep_mlp(x, hook):
        u = g.mlp_out_index[hook.layer()]
        first_copy = x.unflatten(0, (K, G, B))[:, 0]
        dynamic.append((first_copy - ablation_outputs[u][None])[None])

    hooks = []
    for i in range(start, L):
        hooks += [(f"blocks.{i}.hook_resid_pre", keep_resid), (f"blocks.{i}.attn.hook_z", merge_z)]
        hooks += [(f"blocks.{i}.attn.hook_{c}", patch_channel(j)) for j, c in enumerate(naming.CHANNELS)]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_in", patch_mlp_in), (f"blocks.{i}.hook_mlp_out", keep_mlp)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        resid = clean.resid[start][None].expand(K * G, -1, -1, -1).flatten(0, 1)
        for block in model.blocks[start:]:
            resid = block(resid)
        resid = resid.unflatten(0, (K, G, B))[:, 0].flatten(0, 1)  # the copies agree outside attention
        d = same_position(range(g.logits_index, g.logits_index + 1))
        if d is not None:
            resid = resid - d[0].flatten(0, 1)
        logits = adapter.unembed_at(resid, positions.repeat(K))
    return logits.unflatten(0, (K, B))
