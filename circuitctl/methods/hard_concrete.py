"""The hard-concrete distribution of L0-regularised masks (Louizos et al. 2018), with the
constants of the edge-pruning and subnetwork-probing references: temperature 2/3, stretched to
[-0.1, 1.1] and clipped to [0, 1], so a mask is exactly 0 or 1 with positive probability.
"""

from __future__ import annotations

import math

import torch

TEMPERATURE = 2 / 3
LEFT, RIGHT = -0.1, 1.1
EPS = 1e-6
# log-alpha offset of P(z > 0): P(z > 0) = sigmoid(log_alpha - TEMPERATURE * log(-LEFT / RIGHT))
_ZERO_OFFSET = TEMPERATURE * math.log(-LEFT / RIGHT)


def sample(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One mask sample z in [0, 1], differentiable with respect to log_alpha (reparameterised)."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u * (1 - 2 * EPS) + EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    return (s * (RIGHT - LEFT) + LEFT).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the expected L0 norm of each mask."""
    return torch.sigmoid(log_alpha - _ZERO_OFFSET)


def binarize(log_alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Bool: the round(sum of P(z > 0)) entries of `mask` with the largest log-alpha (the
    reference's deterministic mask at its expected sparsity; ties by index)."""
    k = int(round(float(prob_nonzero(log_alpha)[mask].sum())))
    key = torch.where(mask, log_alpha.float(), torch.tensor(float("-inf"), device=log_alpha.device)).flatten()
    keep = torch.zeros_like(key, dtype=torch.bool)
    keep[torch.sort(key, descending=True, stable=True).indices[:k]] = True
    return keep.view_as(mask) & mask


def log_alpha_for_keep(p_keep: torch.Tensor, clip: float = 10.0) -> torch.Tensor:
    """The log-alpha whose noiseless mask (sigmoid(log_alpha / T), stretched) equals p_keep."""
    s = ((p_keep - LEFT) / (RIGHT - LEFT)).clamp(EPS, 1 - EPS)
    return (TEMPERATURE * (torch.log(s) - torch.log1p(-s))).clamp(-clip, clip)


def ranks01(values: torch.Tensor) -> torch.Tensor:
    """Ranks scaled to [0, 1] (0 = smallest; ties by index)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    ranks[order] = torch.arange(len(values), dtype=torch.float32, device=values.device)
    return ranks / max(1, len(values) - 1)


def warm_start(scores: torch.Tensor, keep_fraction: float, softness: float = 0.2) -> torch.Tensor:
    """Log-alphas from another method's scores (1-D, one per edge): the rank q of |score| becomes
    a keep probability sigmoid((q - b) / softness), with b chosen by bisection so that the mean
    is `keep_fraction`, then inverted through the hard-concrete stretch."""
    q = ranks01(scores.abs())
    lo, hi = -1.0, 2.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(torch.sigmoid((q - mid) / softness).mean()) > keep_fraction:
            lo = mid
        else:
            hi = mid
    return log_alpha_for_keep(torch.sigmoid((q - (lo + hi) / 2) / softness))
