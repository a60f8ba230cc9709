"""Per-example faithfulness and bootstrap confidence intervals, for `evaluate faithfulness`.

Inputs are the metric of every example under each evaluated circuit (`CircuitEvaluator`
with ``per_example``): the full model m_i(M), every unit ablated m_i(empty), the circuit
m_i(C), its complement and the curve's circuits. Nothing here reruns the model, except the
extra ranking pass for metrics that do not rank the answer themselves (`ranking_values`).

Definitions (see README, "Per-example faithfulness"):

* per-example f_i = (m_i(C) - m_i(empty)) / (m_i(M) - m_i(empty)): each example normalised by
  its own gap, so f_i is the fraction of *that example's* effect the circuit keeps. An example
  whose gap is below `MIN_EXAMPLE_GAP` x the dataset's |mean gap| has no effect to explain:
  its f_i is undefined (counted, left out of the quantiles, never 0). The mean of the f_i is
  not the dataset's f, which is the ratio of the means.
* "the circuit alone ranks the answer above the wrong answer": logit_diff > 0 (mean answer
  logit above mean wrong-answer logit) or prob_diff > 0 (more probability on the answers);
  other metrics (kl) have no answer to rank, so the logit difference of the same circuits is
  computed in one more patched pass when the task has wrong answers (otherwise: not available).
  Reported among the examples the full model ranks right.
* confidence intervals: 95 % percentile intervals over bootstrap resamples of the examples;
  each resample's f, completeness, CPR and CMD are the dataset formulas applied to the means of
  the resampled examples' metric values (ratios of means, the circuits held fixed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from circuitctl.analysis.bootstrap import CONFIDENCE, percentile_interval, resample_indices, resampled_means
from circuitctl.metrics.faithfulness import GAP_EPSILON, cpr_cmd

QUANTILES = (5, 25, 50, 75, 95)
MIN_EXAMPLE_GAP = 0.01  # an example's |m(M) - m(empty)| below this x the dataset's: f_i undefined
N_WORST = 5
RANKING_METRICS = {
    "logit_diff": "logit_diff > 0: the answers' mean logit above the wrong answers'",
    "prob_diff": "prob_diff > 0: more probability on the answers than on the wrong answers",
}


@dataclass
class ExampleValues:
    """The metric of every example (float64 [N] each; curves [n_points, N])."""

    full: torch.Tensor
    empty: torch.Tensor
    circuit: torch.Tensor
    complement: torch.Tensor
    signed: torch.Tensor  # the curve's circuits ranked by signed score
    absolute: torch.Tensor  # ... by |score|


def example_faithfulness(values: ExampleValues) -> torch.Tensor:
    """f_i of every example (float64 [N]); NaN where the example's gap is too small to normalise by."""
    gap = values.full - values.empty
    dataset_gap = abs(float(gap.mean()))
    scale = torch.maximum(torch.ones_like(gap), torch.maximum(values.full.abs(), values.empty.abs()))
    undefined = (gap.abs() < MIN_EXAMPLE_GAP * dataset_gap) | (gap.abs() < GAP_EPSILON * scale)
    f = (values.circuit - values.empty) / torch.where(undefined, torch.ones_like(gap), gap)
    return torch.where(undefined, torch.full_like(f, float("nan")), f)


def summary(
    values: ExampleValues,
    ranking: tuple[torch.Tensor, torch.Tensor] | None,
    ranking_criterion: str,
    describe: Callable[[int], dict],
    n_worst: int = N_WORST,
) -> dict:
    """The ``per_example`` record: quantiles of f_i, the answer-ranking agreement, the worst examples.

    `ranking`: (full model, circuit) values whose sign says whether the answer is ranked above the
    wrong answer (None: not available, `ranking_criterion` says why); `describe(i)`: example i's
    prompt (text or token ids) and answers."""
    f = example_faithfulness(values)
    defined = ~torch.isnan(f)
    record: dict = {
        "normalisation": "own gap: f_i = (m_i(C) - m_i(empty)) / (m_i(M) - m_i(empty))",
        "n_examples": int(f.numel()),
        "n_undefined": int((~defined).sum()),
        "undefined_rule": f"|m_i(M) - m_i(empty)| < {MIN_EXAMPLE_GAP:g} x |mean gap|",
        "quantiles": None,
        "mean": None,
    }
    if bool(defined.any()):
        kept = f[defined]
        levels = torch.tensor([q / 100 for q in QUANTILES], dtype=torch.float64, device="cpu")
        record["quantiles"] = {str(q): float(v) for q, v in zip(QUANTILES, torch.quantile(kept, levels))}
        record["mean"] = float(kept.mean())
    record["ranking"] = _ranking(ranking, ranking_criterion)
    order = sorted(defined.nonzero().flatten().tolist(), key=lambda i: (float(f[i]), i))[:n_worst]
    record["worst"] = [
        {
            "index": i,
            "f": float(f[i]),
            "metric_full": float(values.full[i]),
            "metric_empty": float(values.empty[i]),
            "metric_circuit": float(values.circuit[i]),
            **describe(i),
        }
        for i in order
    ]
    return record


def _ranking(ranking, criterion: str) -> dict:
    if ranking is None:
        return {"criterion": None, "note": criterion, "fraction": None}
    full_right, circuit_right = ranking[0] > 0, ranking[1] > 0
    n_model, n_both = int(full_right.sum()), int((full_right & circuit_right).sum())
    return {
        "criterion": criterion,
        "n_model_right": n_model,  # the full model ranks the answer above the wrong answer
        "n_circuit_right": int(circuit_right.sum()),
        "n_both_right": n_both,
        "fraction": n_both / n_model if n_model else None,  # of the examples the model ranks right
    }


def confidence_intervals(values: ExampleValues, percentages: list[float] | None, n_resamples: int, seed: int) -> dict | None:
    """95 % bootstrap intervals of f, completeness, CPR and CMD (None without resamples)."""
    if n_resamples <= 0:
        return None
    rows = torch.cat([values.full[None], values.empty[None], values.circuit[None], values.complement[None], values.signed, values.absolute])
    indices = resample_indices(rows.shape[1], n_resamples, seed)
    means = resampled_means(rows, indices)  # [R, K]
    f = ratio(means[:, 2:], means[:, 0:1], means[:, 1:2])  # [R, K - 2], NaN where undefined
    n = values.signed.shape[0]
    record = {
        "level": CONFIDENCE,
        "n_resamples": n_resamples,
        "seed": seed,
        "method": "percentile intervals over resamples of the examples (per-example metric values; no reruns)",
        "faithfulness": percentile_interval(f[:, 0].tolist()),
        "completeness": percentile_interval(f[:, 1].tolist()),
        "cpr": None,
        "cmd": None,
    }
    if percentages is not None:
        areas = [cpr_cmd(_listed(row[2 : 2 + n]), _listed(row[2 + n :]), percentages) for row in f]
        record["cpr"] = percentile_interval([a[0] for a in areas])
        record["cmd"] = percentile_interval([a[1] for a in areas])
    return record


def ratio(m: torch.Tensor, m_full: torch.Tensor, m_empty: torch.Tensor) -> torch.Tensor:
    """normalized_faithfulness, elementwise: NaN where it is undefined."""
    gap = m_full - m_empty
    scale = torch.maximum(torch.ones_like(gap), torch.maximum(m_full.abs(), m_empty.abs()))
    undefined = ~torch.isfinite(gap) | (gap.abs() < GAP_EPSILON * scale)  # normalized_faithfulness's rule
    f = (m - m_empty) / torch.where(undefined, torch.ones_like(gap), gap)
    return torch.where(undefined.expand_as(f), torch.full_like(f, float("nan")), f)


def _listed(row: torch.Tensor) -> list[float | None]:
    return [None if v != v else v for v in row.tolist()]  # NaN -> None (undefined)


def ranking_values(evaluator, circuit: torch.Tensor, full: torch.Tensor, circuit_values: torch.Tensor):
    """(full model, circuit) values whose sign is the answer ranking, and the criterion; or
    (None, why not). For metrics other than logit_diff / prob_diff the logit difference of the
    full model and of the circuit are computed (one more patched pass) when the task has wrong answers."""
    engine = evaluator.engine
    name = engine.metric.name
    if name in RANKING_METRICS:
        return (full, circuit_values), RANKING_METRICS[name]
    data = engine.data
    if data.wrong.shape[1] == 0 or not bool((data.wrong >= 0).any(1).all()):
        return None, f"metric {name} ranks no answer and the task has no wrong answers to rank it against"
    from circuitctl.circuits.evaluator import CircuitEvaluator
    from circuitctl.metrics.metrics import METRICS

    other = CircuitEvaluator(
        evaluator.space, engine.adapter, data, METRICS.get("logit_diff"), engine.ablation, engine.batch_size, engine.cache_gib
    )
    logit_full = other.engine.clean_values_per_example()
    logit_circuit = other.per_example_values(circuit[None])[0]
    return (logit_full, logit_circuit), f"logit_diff > 0 of the same circuit (metric {name} ranks no answer itself)"


def describe_example(adapter, data, i: int) -> dict:
    """Example i's clean prompt and answers: text through the model's tokenizer, else token ids."""
    ids = data.clean[i, : int(data.lengths[i])].tolist()
    answers = [a for a in data.answers[i].tolist() if a >= 0]
    wrong = [w for w in data.wrong[i].tolist() if w >= 0] if data.wrong.shape[1] else []
    tokenizer = adapter.tokenizer
    if tokenizer is None:
        return {"tokens": ids, "answers": answers, "wrong_answers": wrong}
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return {"prompt": decode(ids), "answers": [decode([a]) for a in answers], "wrong_answers": [decode([w]) for w in wrong]}


def per_example_report(evaluator, circuit: torch.Tensor, rows: torch.Tensor, n_curve: int, percentages, n_resamples: int, seed: int):
    """(per_example record, confidence record) of a circuit whose evaluation filled `rows` [2 + 2 n_curve, N]
    (circuit, complement, signed curve, absolute curve), as `circuitctl.report.faithfulness_report` does."""
    full, empty = evaluator.full_and_empty_per_example()
    values = ExampleValues(full, empty, rows[0], rows[1], rows[2 : 2 + n_curve], rows[2 + n_curve :])
    ranking, criterion = ranking_values(evaluator, circuit, full, rows[0])
    adapter, data = evaluator.engine.adapter, evaluator.engine.data
    record = summary(values, ranking, criterion, lambda i: describe_example(adapter, data, i))
    return record, confidence_intervals(values, percentages, n_resamples, seed)
