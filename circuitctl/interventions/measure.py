"""What an intervention changes on one task: metric, accuracy and f, before and after.

Everything runs through the one evaluator (`circuitctl.circuits.evaluator.CircuitEvaluator`), so
the config's ablation, out-of-memory halving and torchrun come with it. One call evaluates three
circuits per example: the full model (before), the edited model (after: the units outside
`keep` ablated) and the empty circuit (every unit ablated), so

    f = (m(after) - m(empty)) / (m(before) - m(empty))

is the normalized faithfulness of `keep`, the number `evaluate faithfulness` reports for the same
circuit (near 0: the behaviour is gone; near 1: it is intact).

Accuracy is the fraction of examples where the metric says the answer wins: logit or probability
difference > 0 (the answers beat the wrong answers). For other metrics (kl, plugins), and always
as ``top1_accuracy``: the fraction where an answer is the model's top-1 token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from circuitctl.metrics.metrics import Metric

WINS_WHEN_POSITIVE = ("logit_diff", "prob_diff")


def _top1_margin(logits: torch.Tensor, batch, reference=None) -> torch.Tensor:
    """Best answer logit minus the best other logit: > 0 exactly when an answer is the top-1 token."""
    answers = batch.answers
    is_answer = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, answers.clamp(min=0), answers >= 0)
    best_answer = logits.masked_fill(~is_answer, float("-inf")).max(-1).values
    best_other = logits.masked_fill(is_answer, float("-inf")).max(-1).values
    return best_answer - best_other


TOP1_MARGIN = Metric("top1_margin", _top1_margin, -1.0, False, "best answer logit minus the best other logit")


@dataclass
class TaskEffect:
    task: str
    origin: str
    n_examples: int
    metric: str
    metric_before: float
    metric_after: float
    metric_empty: float  # every unit of the space ablated
    faithfulness: float | None  # f of the kept units; None when undefined (m(before) = m(empty))
    accuracy_before: float
    accuracy_after: float
    accuracy_rule: str
    top1_accuracy_before: float
    top1_accuracy_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(space, keep: torch.Tensor, adapter, data, metric: Metric, ablation, batch_size: int, task: str, origin: str) -> TaskEffect:
    """Metric, accuracy and f on one task with the units outside `keep` (bool, shaped like space.mask) ablated."""
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.metrics.faithfulness import normalized_faithfulness

    full, empty = space.mask.clone(), torch.zeros_like(space.mask)
    evaluator = CircuitEvaluator(space, adapter, data, metric, ablation, batch_size)
    values = evaluator.per_example_values(torch.stack([full, keep & space.mask, empty]))  # [3, N]
    before, after, none = (float(v) for v in values.mean(1))
    top1 = CircuitEvaluator(space, adapter, data, TOP1_MARGIN, ablation, batch_size).per_example_values(torch.stack([full, keep & space.mask]))
    top1_rates = (top1 > 0).double().mean(1).tolist()
    if metric.name in WINS_WHEN_POSITIVE:
        rates, rule = (values[:2] > 0).double().mean(1).tolist(), f"{metric.name} > 0"
    else:
        rates, rule = top1_rates, "an answer is the top-1 token"
    return TaskEffect(
        task=task,
        origin=origin,
        n_examples=data.n,
        metric=metric.name,
        metric_before=before,
        metric_after=after,
        metric_empty=none,
        faithfulness=normalized_faithfulness(after, before, none),
        accuracy_before=rates[0],
        accuracy_after=rates[1],
        accuracy_rule=rule,
        top1_accuracy_before=top1_rates[0],
        top1_accuracy_after=top1_rates[1],
    )
