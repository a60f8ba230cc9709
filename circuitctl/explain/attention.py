"""Attention summaries of a head on the task's prompts, from labelled query positions.

For one query position per example (the answer position, or a labelled position) and one
attention row per example, the mean attention to each *target*: every labelled position of the
task, `first` (position 0: BOS, or the first token), `previous` (the query's position - 1),
`self`, and `other` (everything not covered by those positions); plus the mean entropy of the
row (nats). The top target is the largest of those means; where two coincide (the `end` label
is the answer position itself) labels win over `first`/`previous`/`self`, which win over `other`.
"""

from __future__ import annotations

import torch

GENERIC_TARGETS = ("first", "previous", "self")
OTHER = "other"


def target_positions(query: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Target name -> [N] key position (-1 where a target does not exist, e.g. previous of 0)."""
    targets = {name: pos.long() for name, pos in labels.items()}
    targets["first"] = torch.zeros_like(query)
    targets["previous"] = torch.where(query > 0, query - 1, torch.full_like(query, -1))
    targets["self"] = query.clone()
    return targets


def _gather(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """rows [..., N, P], positions [N] (-1: none) -> [..., N] attention at those keys (0 for none)."""
    index = positions.clamp(min=0).expand(*rows.shape[:-1])[..., None]
    return rows.gather(-1, index)[..., 0] * (positions >= 0)


def summarize(rows: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """rows [..., N, P]: one attention row per example. Returns name -> [...] mean attention,
    with `other` and `entropy` added."""
    means = {name: _gather(rows, pos).mean(-1) for name, pos in targets.items()}
    covered = torch.zeros(rows.shape[-2:], dtype=torch.bool)
    n = torch.arange(rows.shape[-2])
    for pos in targets.values():
        ok = pos >= 0
        covered[n[ok], pos[ok]] = True
    means[OTHER] = (1 - (rows * covered).sum(-1)).clamp(min=0).mean(-1)
    logs = torch.where(rows > 0, rows.clamp(min=1e-30).log(), torch.zeros_like(rows))
    means["entropy"] = -(rows * logs).sum(-1).mean(-1)
    return means


def top_target(means: dict[str, float], labels: list[str], tol: float = 1e-6) -> tuple[str, float]:
    """(name, mean attention) of the strongest target; ties resolved labels > generic > other."""
    order = [*labels, *GENERIC_TARGETS, OTHER]
    best = max(means[name] for name in order if name in means)
    for name in order:
        if name in means and means[name] >= best - tol:
            return name, float(means[name])
    raise ValueError("no targets")  # unreachable: `order` always names `other`


def movable_targets(tokens: torch.Tensor, targets: dict[str, torch.Tensor], answer: torch.Tensor, labels: list[str]) -> list[str]:
    """Targets a mover can move from: labelled positions (and the first token) that are not the
    answer position and whose token varies across prompts (a fixed token carries nothing)."""
    n = torch.arange(tokens.shape[0])
    movable = []
    for name in [*labels, "first"]:
        pos = targets[name]
        if bool((pos == answer).all()):
            continue
        held = tokens[n, pos.clamp(min=0)]
        if bool((held != held[0]).any()):
            movable.append(name)
    return movable
