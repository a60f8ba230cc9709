"""Bootstrap resamples of a task's examples, shared by confidence intervals and stability.

A resample is n example indices drawn with replacement (`resample_indices`); statistics of a
resample are computed from per-example values (no model reruns) through the count of each
example in it (`resampled_means`).
"""

from __future__ import annotations

import torch

CONFIDENCE = 0.95  # two-sided percentile intervals


def resample_indices(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    """[n_resamples, n] example indices drawn with replacement, reproducibly from `seed`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, n, (n_resamples, n), generator=generator, device="cpu")


def resampled_means(values: torch.Tensor, indices: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Means of per-example `values` [K, N] over each resample of `indices` [R, N']: float64 [R, K]."""
    values = values.double().cpu()
    indices = indices.cpu()
    out = []
    for lo in range(0, indices.shape[0], chunk):
        part = indices[lo : lo + chunk]
        counts = torch.zeros(part.shape[0], values.shape[1], dtype=torch.float64, device="cpu")
        counts.scatter_add_(1, part, torch.ones_like(part, dtype=torch.float64))
        out.append(counts @ values.T / part.shape[1])
    return torch.cat(out) if out else torch.zeros(0, values.shape[0], dtype=torch.float64, device="cpu")


def percentile_interval(samples, level: float = CONFIDENCE) -> list[float] | None:
    """The central `level` percentile interval [lo, hi] of the finite samples (None if there are none)."""
    values = torch.tensor([s for s in samples if s is not None], dtype=torch.float64, device="cpu")
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return None
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64, device="cpu")).tolist()
    return [lo, hi]
