"""The forward passes an explanation needs, batched, keeping only what it reads.

`capture_task` runs the task's prompts once (clean or corrupt) and keeps, per example:
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
            resid, cache = model.run_with_cache(batch, names_filter=lambda name: name in wanted, stop_at_layer=model.cfg.n_layers)
            parts.setdefault("resid_final", []).append(resid[rows, ans].float().cpu())
            for name in wanted:
                value = cache[name]
                if name.endswith("hook_pattern"):  # [B, H, Q_all, K] -> [B, H, Q, K]
                    picked = value[rows[:, None], :, q].permute(0, 2, 1, 3)
                elif name.endswith("hook_z"):  # [B, P, H, e] -> head outputs [B, H, d]
                    layer = int(name.split(".")[1])
                    picked = torch.einsum("bhe,hed->bhd", value[rows, ans], model.blocks[layer].attn.W_O)
                else:
                    picked = value[rows, ans]
                parts.setdefault(name, []).append(picked.float().cpu())
    full = _cat(parts)
    capture = TaskCapture(resid_final=full.pop("resid_final"))
    for name, value in full.items():
        if name in extra_hooks:
            capture.hooks[name] = value
        if name.endswith("hook_pattern"):
            capture.rows[int(name.split(".")[1])] = value
        elif name.endswith("hook_z"):
            capture.head_out[int(name.split(".")[1])] = value
        elif name.endswith("hook_mlp_out"):
            capture.mlp_out[int(name.split(".")[1])] = value
        elif name.endswith("hook_post"):
            capture.post[int(name.split(".")[1])] = value
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
