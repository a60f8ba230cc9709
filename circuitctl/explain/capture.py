"""The forward passes an explanation needs, batched, keeping only what it reads.

`capture_task` runs the task's prompts once (clean or corrupt) and keeps, per example, reduced
inside the hooks as the pass runs:
attention rows of the circuit's layers from the query positions, each head's and MLP's output
and the MLP hidden activations at the answer position, the final residual stream there, and
any extra hook (SAE sites) at the answer position. `capture_patterns` keeps whole attention
patterns of short probe sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaskCapture:
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, H, Q, P] attention from the queries
    head_out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, H, d] at the answer (no b_O)
    mlp_out: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, d] at the answer
    post: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, d_mlp] at the answer
    hooks: dict[str, torch.Tensor] = field(default_factory=dict)  # extra hook -> [N, d] at the answer
    resid_final: torch.Tensor | None = None  # [N, d] before the final normalisation


def _cat(parts: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _reducer(name: str, model, rows: torch.Tensor, ans: torch.Tensor, q: torch.Tensor):
    """What to keep of hook `name`'s value, taken as soon as the hook fires (so no [B, H, P, P]
    pattern of every layer is held at once)."""
    if name.endswith("hook_pattern"):  # [B, H, P, K] -> rows of the queries [B, H, Q, K]
        return lambda value: value[rows[:, None], :, q].permute(0, 2, 1, 3)
    if name.endswith("hook_z"):  # [B, P, H, e] -> each head's output at the answer [B, H, d] (no b_O)
        W_O = model.blocks[int(name.split(".")[1])].attn.W_O
        return lambda value: torch.einsum("bhe,hed->bhd", value[rows, ans], W_O)
    return lambda value: value[rows, ans]


def capture_task(
    model,
    tokens: torch.Tensor,
    queries: torch.Tensor,
    answer: torch.Tensor,
    head_layers: set[int],
    mlp_layers: set[int],
    extra_hooks: list[str],
    batch_size: int,
) -> TaskCapture:
    """tokens [N, P]; queries [N, Q] token index of each query; answer [N] answer positions."""
    wanted = {f"blocks.{layer}.attn.hook_{name}" for layer in head_layers for name in ("pattern", "z")}
    wanted |= {f"blocks.{layer}.{name}" for layer in mlp_layers for name in ("hook_mlp_out", "mlp.hook_post")}
    wanted |= set(extra_hooks)
    device = model.W_U.device
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            rows = torch.arange(batch.shape[0], device=device)
            ans = answer[start : start + batch_size].to(device)
            q = queries[start : start + batch_size].to(device)

            reducers = {name: _reducer(name, model, rows, ans, q) for name in wanted}

            def keep(value, hook):
                parts.setdefault(hook.name, []).append(reducers[hook.name](value).float().cpu())

            with model.hooks(fwd_hooks=[(name, keep) for name in sorted(wanted)]):
                resid = model(batch, stop_at_layer=model.cfg.n_layers)
            parts.setdefault("resid_final", []).append(resid[rows, ans].float().cpu())
    full = _cat(parts)
    capture = TaskCapture(resid_final=full.pop("resid_final"))
    for name, value in full.items():
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if name in extra_hooks:
            capture.hooks[name] = value
        if name.endswith("hook_pattern"):
            capture.rows[layer] = value
        elif name.endswith("hook_z"):
            capture.head_out[layer] = value
        elif name.endswith("hook_mlp_out"):
            capture.mlp_out[layer] = value
        elif name.endswith("hook_post"):
            capture.post[layer] = value
    return capture


def capture_patterns(model, tokens: torch.Tensor, layers: set[int], batch_size: int) -> dict[int, torch.Tensor]:
    """layer -> [N, H, P, P] attention patterns of the given layers."""
    if not layers:
        return {}
    wanted = {f"blocks.{layer}.attn.hook_pattern" for layer in layers}
    device = model.W_U.device
    parts: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            _, cache = model.run_with_cache(batch, names_filter=lambda name: name in wanted, stop_at_layer=max(layers) + 1)
            for layer in layers:
                parts.setdefault(layer, []).append(cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}
