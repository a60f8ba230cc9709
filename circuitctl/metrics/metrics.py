"""Task metrics at the answer position.

Every metric maps logits at the answer positions [B, vocab] to one value per example.
`importance_sign` turns "metric after ablating an edge minus the clean metric" into an
importance that is positive when removing the edge hurts: logit and probability
differences drop (sign -1); the KL divergence from the full model grows (sign +1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from circuitctl.registry import Registry
from circuitctl.tasks.data import TaskData

MetricFn = Callable[[torch.Tensor, TaskData, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    importance_sign: float
    needs_wrong_answers: bool
    description: str

    def __call__(self, logits: torch.Tensor, batch: TaskData, reference: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(logits.float(), batch, reference)


METRICS: Registry[Metric] = Registry("metric")


def _mean_gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding (>= 0) ids of values[row, id]; values [B, V], ids [B, A]."""
    mask = ids >= 0
    picked = values.gather(1, ids.clamp(min=0)) * mask
    return picked.sum(1) / mask.sum(1).clamp(min=1)


def _sum_gather(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mask = ids >= 0
    return (values.gather(1, ids.clamp(min=0)) * mask).sum(1)


def logit_diff(logits, batch, reference=None):
    return _mean_gather(logits, batch.answers) - _mean_gather(logits, batch.wrong)


def prob_diff(logits, batch, reference=None):
    probs = logits.softmax(-1)
    return _sum_gather(probs, batch.answers) - _sum_gather(probs, batch.wrong)


_reference_cache: list = [None, -1, None, None]  # [reference tensor, its version, log-probs, probs]


def _reference_distribution(reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and probs of the reference logits. Searches (ACDC) compare thousands of trials
    with the same reference tensor, and a vocabulary-wide log_softmax + exp per call would be a
    quarter of a trial's cost, so the last reference's are kept. The cache holds the tensor
    itself (its memory cannot be reused by another) and its in-place version counter."""
    cached, version, logp, p = _reference_cache
    if cached is not reference or version != reference._version:
        logp = reference.float().log_softmax(-1)
        p = logp.exp()
        _reference_cache[:] = [reference, reference._version, logp, p]
    return logp, p


def kl_divergence(logits, batch, reference):
    # elementwise log-prob differences: exact to rounding for close distributions (the
    # shortcut sum p*logp - p.logits + logsumexp cancels large terms and loses ~1e-3)
    ref_logp, ref_p = _reference_distribution(reference)
    return (ref_p * (ref_logp - logits.log_softmax(-1))).sum(-1)


for _metric in (
    Metric("logit_diff", logit_diff, -1.0, True, "logit of the answer minus logit of the wrong answer (means over several)"),
    Metric("prob_diff", prob_diff, -1.0, True, "probability mass on the answers minus on the wrong answers"),
    Metric("kl", kl_divergence, 1.0, False, "KL divergence from the full model's next-token distribution"),
):
    METRICS.add(_metric.name, _metric)
