"""Checks that a task carries a signal before a discovery method spends its time on it.

A method ranks edges by how much ablating them moves the metric from m(full) towards
m(empty). When the two are the same (every corrupt prompt equals its clean prompt, a mean
ablation over one example) or their gap is tiny next to how much the metric varies between
examples, every score is noise and the normalized faithfulness
f(C) = (m(C) - m(empty)) / (m(full) - m(empty)) is undefined. `check_task_signal` measures,
with one clean, one ablation and one fully ablated pass over the task:

* the gap m(full) - m(empty) (the mean over examples of each example's own gap) and its
  standard error over examples;
* the metric's spread: the standard deviation of the clean metric over examples;
* the clean accuracy: the fraction of examples where every answer's logit beats every wrong
  answer's (without wrong answers: where the top next token is an answer);
* the wrong-sign fraction: the fraction of examples whose own gap points against the mean gap
  (the corrupt prompt moves the metric the other way).

It refuses the task (exit 2) when there is no gap, unless `checks.allow_small_gap` (or
`discover --allow-small-gap`) says the user means it, and reports warnings as notes.
Pure judgement (`judge_task_signal`) is separate from measurement (`measure_task_signal`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from circuitctl.errors import UsageError

# A gap smaller than this fraction of the metric's spread over examples is no gap.
MIN_GAP_TO_SPREAD = 0.01
# A gap within this many standard errors of zero may be noise (about 95 % two-sided).
GAP_STANDARD_ERRORS = 2.0
# Warn when the model gets the clean task right on fewer examples than this.
MIN_CLEAN_ACCURACY = 0.5
# Warn when more examples than this have a gap of the wrong sign.
MAX_WRONG_SIGN_FRACTION = 0.25

OVERRIDE = "pass --allow-small-gap (or set checks.allow_small_gap: true) to run anyway"


@dataclass(frozen=True)
class TaskSignal:
    """What the check measured; `to_dict()` goes into the summary and circuit.json (`task_signal`)."""

    n_pairs: int
    metric: str
    ablation: str
    metric_full: float
    metric_empty: float
    gap: float  # m(full) - m(empty)
    gap_standard_error: float | None  # None for a single example
    metric_spread: float  # standard deviation of the clean metric over examples
    clean_accuracy: float
    accuracy_kind: str
    wrong_sign_fraction: float
    identical_pairs: int  # pairs whose corrupt prompt equals the clean prompt
    per_position_mean: bool = True  # for a mean ablation: per position (else over all positions)

    def to_dict(self, warnings: list[str] | None = None) -> dict:
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        record.pop("per_position_mean")
        record["warnings"] = list(warnings or [])
        return record


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(
    full: list[float],
    empty: list[float],
    correct: list[bool],
    identical: int,
    metric: str,
    ablation: str,
    accuracy_kind: str,
    per_position_mean: bool = True,
) -> TaskSignal:
    """A TaskSignal from per-example metric values (clean run, every edge ablated)."""
    n = len(full)
    gaps = [f - e for f, e in zip(full, empty)]
    gap = sum(gaps) / n
    sign = 1.0 if gap >= 0 else -1.0
    return TaskSignal(
        n_pairs=n,
        metric=metric,
        ablation=ablation,
        metric_full=sum(full) / n,
        metric_empty=sum(empty) / n,
        gap=gap,
        gap_standard_error=_std(gaps) / math.sqrt(n) if n > 1 else None,
        metric_spread=_std(full),
        clean_accuracy=sum(correct) / n,
        accuracy_kind=accuracy_kind,
        wrong_sign_fraction=sum(1 for g in gaps if g * sign < 0) / n,
        identical_pairs=identical,
        per_position_mean=per_position_mean,
    )


def judge_task_signal(signal: TaskSignal, allow_small_gap: bool = False) -> list[str]:
    """Raise UsageError for a task without signal (unless allowed); return the warnings."""
    warnings: list[str] = []
    n, gap, se = signal.n_pairs, signal.gap, signal.gap_standard_error
    numbers = f"m(full) {signal.metric_full:.6g}, m(empty) {signal.metric_empty:.6g}, gap {gap:.3g}" + (
        f" (standard error {se:.3g} over {n} pairs)" if se is not None else " (1 pair: no standard error)"
    )
    refusals: list[str] = []
    if signal.ablation == "mean" and n == 1:
        if signal.per_position_mean:
            refusals.append(
                "ablation: mean over a single example replaces every activation with its own clean value, so the empty "
                f"circuit is the full model ({numbers}); use more pairs, or ablation: resample or zero"
            )
        else:
            warnings.append("ablation: mean over a single example averages one prompt's positions only; use more pairs")
    if signal.ablation == "resample" and signal.identical_pairs == n:
        refusals.append(
            f"every corrupt prompt equals its clean prompt ({n} of {n} pairs), so a resample ablation changes nothing: "
            f"the task has no clean-corrupt gap ({numbers})"
        )
    elif signal.ablation == "resample" and signal.identical_pairs:
        warnings.append(
            f"{signal.identical_pairs} of {n} pairs have a corrupt prompt equal to the clean prompt; they carry no signal"
        )
    scale = signal.metric_spread or max(abs(signal.metric_full), abs(signal.metric_empty))
    if not refusals and abs(gap) <= MIN_GAP_TO_SPREAD * scale:
        what = "its spread over examples" if signal.metric_spread else "its size"
        refusals.append(
            f"the clean-corrupt gap of metric '{signal.metric}' is tiny next to {what} ({numbers}; "
            f"{'spread' if signal.metric_spread else 'size'} {scale:.3g}): every score and f(C) would be noise"
        )
    elif not refusals and se is not None and abs(gap) < GAP_STANDARD_ERRORS * se:
        warnings.append(
            f"the clean-corrupt gap {gap:.3g} is within {GAP_STANDARD_ERRORS:g} standard errors ({se:.3g}) of zero over "
            f"{n} pairs: scores may be noise; use more pairs"
        )
    if refusals:
        if not allow_small_gap:
            raise UsageError("task has no signal: " + "; ".join(refusals) + f"; {OVERRIDE}")
        warnings = [f"running although {r} (allowed by checks.allow_small_gap)" for r in refusals] + warnings
    if signal.clean_accuracy < MIN_CLEAN_ACCURACY:
        warnings.append(
            f"the model gets the clean task right on only {signal.clean_accuracy:.0%} of {n} pairs "
            f"({signal.accuracy_kind}); a circuit for a behaviour the model lacks means little"
        )
    if signal.wrong_sign_fraction > MAX_WRONG_SIGN_FRACTION:
        warnings.append(
            f"{signal.wrong_sign_fraction:.0%} of pairs have a clean-corrupt gap of the wrong sign "
            "(their corrupt prompt moves the metric the other way)"
        )
    return warnings


def measure_task_signal(adapter, data, metric, ablation, batch_size: int) -> TaskSignal:
    """Per-example metric of the clean run and of the run with every edge ablated, over the task."""
    import torch

    from circuitctl.patching.engine import PatchingEngine

    engine = PatchingEngine(adapter, data, metric, ablation, batch_size)
    everything = adapter.graph.edge_mask[None].clone()
    full: list[float] = []
    empty: list[float] = []
    correct: list[bool] = []
    has_wrong = data.wrong.shape[1] > 0
    with torch.no_grad():
        for state in engine.states():
            full += engine.metric_of_logits(state.clean.logits, state).tolist()
            empty += engine.patched_metric(state, everything)[0].tolist()
            correct += _correct(state.clean.logits.float(), state.batch, has_wrong).tolist()
    identical = int((data.clean == data.corrupt).all(dim=1).sum())
    kind = "every answer's logit above every wrong answer's" if has_wrong else "the top next token is an answer"
    return summarize(full, empty, correct, identical, metric.name, ablation.type, kind, ablation.per_position)


def _correct(logits, batch, has_wrong: bool):
    """Bool [B]: the clean run answers correctly."""
    import torch

    answers = batch.answers.to(logits.device)
    masked = torch.full_like(logits[:, :1].expand(-1, answers.shape[1]), float("inf"))
    lowest_answer = torch.where(answers >= 0, logits.gather(1, answers.clamp(min=0)), masked).min(1).values
    if has_wrong:
        wrong = batch.wrong.to(logits.device)
        floor = torch.full_like(logits[:, :1].expand(-1, wrong.shape[1]), float("-inf"))
        highest_wrong = torch.where(wrong >= 0, logits.gather(1, wrong.clamp(min=0)), floor).max(1).values
        return lowest_answer > highest_wrong
    top = logits.argmax(-1, keepdim=True)
    return ((answers == top) & (answers >= 0)).any(1)


def check_task_signal(session, config) -> dict:
    """Measure and judge the task of an open session before a method runs: raises UsageError for
    a task without signal (unless `checks.allow_small_gap`), sends warnings to the run's notes,
    and returns the `task_signal` record for the summary and circuit.json."""
    from circuitctl.batching import note

    signal = measure_task_signal(session.adapter, session.data, session.metric, config.ablation, config.batch_size)
    warnings = judge_task_signal(signal, allow_small_gap=config.checks.allow_small_gap)
    for warning in warnings:
        note(f"warning: {warning}")
    return signal.to_dict(warnings)
