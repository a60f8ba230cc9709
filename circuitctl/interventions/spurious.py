"""SHIFT-style selection (Marks et al. 2024): rank a run's units by their effect on an unwanted behaviour.

A task's pairs may name a second answer set, ``spurious_answers`` (and
``spurious_wrong_answers``): the behaviour to remove, such as a classifier's reliance on
gender. The spurious metric is the task's metric with those answers. Each candidate unit (the
run's circuit, error nodes left out: an edit removes features, not the SAE's residue) is
ablated alone, with the config's ablation, through the one evaluator, and gets the exact
effect

    spurious importance(u) = importance sign x (m_spurious(u ablated) - m_spurious(full model))

(positive: ablating u lowers the spurious behaviour). ``top=N:by=spurious`` takes the N
candidates with the largest positive importance.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from circuitctl.errors import UsageError

MAX_CANDIDATES = 512  # single-unit ablations per ranking (the circuit's strongest units by |score|)
CANDIDATES_PER_CALL = 64  # masks handed to the evaluator at once (its cache keeps the batches)


def spurious_data(session):
    """The session's task with its spurious answers as the answers (`TaskData`)."""
    from circuitctl.session import tokenize_task
    from circuitctl.tasks.data import task_pairs

    config, task = session.config, session.task
    pairs = task_pairs(task, session.adapter.tokenizer, config.task.n_pairs, config.seed, config.task.options)
    return tokenize_task(spurious_pairs(pairs, task.origin, session.metric), task, session.adapter, session.metric)


def spurious_pairs(pairs, origin: str, metric) -> list:
    """The pairs with their spurious answer sets as answers; a UsageError names the first pair
    that has none (or lacks the wrong answers the metric needs)."""
    missing = next((p for p in pairs if not p.spurious_answers), None)
    if missing is not None:
        where = f"{origin} line {missing.line}" if missing.line else origin
        raise UsageError(f"{where}: by=spurious needs 'spurious_answers' (and, for {metric.name}, 'spurious_wrong_answers') on every pair")
    swapped = [replace(p, answers=p.spurious_answers, wrong_answers=p.spurious_wrong_answers) for p in pairs]
    if metric.needs_wrong_answers and any(not p.wrong_answers for p in swapped):
        first = next(p for p in swapped if not p.wrong_answers)
        where = f"{origin} line {first.line}" if first.line else origin
        raise UsageError(f"{where}: metric '{metric.name}' needs 'spurious_wrong_answers' beside 'spurious_answers' on every pair")
    return swapped


def has_spurious_answers(pairs) -> bool:
    return bool(pairs) and all(p.spurious_answers for p in pairs)


def candidates(space, scores: torch.Tensor, membership: torch.Tensor) -> list[int]:
    """Flat indices of the units to rank: the run's circuit (features: no error nodes), strongest
    |score| first, at most MAX_CANDIDATES."""
    from circuitctl.interventions.masks import error_nodes

    member = (membership & space.mask & ~error_nodes(space)).flatten()
    flat_scores = scores.flatten().abs().float()
    order = torch.sort(flat_scores.masked_fill(~member, -1.0), descending=True, stable=True).indices
    return [int(i) for i in order[: min(int(member.sum()), MAX_CANDIDATES)].tolist()]


def spurious_importance(space, indices: list[int], session, batch_size: int) -> dict[int, float]:
    """{flat index: importance on the spurious metric} of each unit ablated alone."""
    from circuitctl.circuits.evaluator import CircuitEvaluator

    data = spurious_data(session)
    evaluator = CircuitEvaluator(space, session.adapter, data, session.metric, session.config.ablation, batch_size)
    full = evaluator.engine.clean_value()
    sign = session.metric.importance_sign
    result: dict[int, float] = {}
    for lo in range(0, len(indices), CANDIDATES_PER_CALL):
        chunk = indices[lo : lo + CANDIDATES_PER_CALL]
        keep = space.mask.flatten()[None].repeat(len(chunk), 1)
        keep[torch.arange(len(chunk), device=keep.device), torch.tensor(chunk, device=keep.device)] = False
        values = evaluator.circuit_values(keep.view(len(chunk), *space.mask.shape))
        result.update({index: float(sign * (value - full)) for index, value in zip(chunk, values.tolist())})
    return result


def rank_by_spurious(space, scores, membership, top: int, session, batch_size: int) -> tuple[torch.Tensor, dict, str]:
    """(selected mask, details for intervention.json, the rule in words) of ``top=N:by=spurious``."""
    from circuitctl.interventions.masks import names_at

    pool = candidates(space, scores, membership)
    if not pool:
        raise UsageError("by=spurious: the run's circuit has no units to rank (features other than error nodes)")
    importance = spurious_importance(space, pool, session, batch_size)
    ranked = sorted(pool, key=lambda i: -importance[i])  # stable: ties keep the |score| order
    chosen = [i for i in ranked if importance[i] > 0][:top]
    if not chosen:
        raise UsageError(f"by=spurious: none of the {len(pool)} circuit {space.unit} lowers the spurious metric when ablated alone")
    selected = torch.zeros(space.mask.numel(), dtype=torch.bool, device=space.mask.device)
    selected[chosen] = True
    selected = selected.view_as(space.mask)
    name = dict(zip(ranked, names_at(space, ranked)))
    details = {
        "ranking": "spurious",
        "candidates": len(pool),
        "spurious_importance": {name[i]: importance[i] for i in ranked},
    }
    rule = f"the top {len(chosen)} of {len(pool)} circuit {space.unit} by their effect on the spurious answers"
    if len(chosen) < top:
        rule += f" (only {len(chosen)} lower the spurious metric when ablated)"
    return selected, details, rule

