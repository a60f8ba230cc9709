"""Circuit evaluation formulas (see ../shared/design/METHODS.md, "Evaluation").

Pure functions of metric values and scores; running the model is the engine's job.
"""

from __future__ import annotations

import math

import torch

MIB_PERCENTAGES = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


GAP_EPSILON = 1e-6  # |m(M) - m(empty)| below this x max(1, |m(M)|, |m(empty)|) is float32 noise: f is undefined


def normalized_faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float | None:
    """f(C) = (m(C) - m(empty)) / (m(M) - m(empty)); None (undefined) when the ablation changes
    nothing beyond float32 noise (see `undefined_reason`): never 0 or NaN, which would read as a result."""
    gap = m_full - m_empty
    if not math.isfinite(gap) or abs(gap) < GAP_EPSILON * max(1.0, abs(m_full), abs(m_empty)):
        return None
    return (m_circuit - m_empty) / gap


def undefined_reason(m_full: float, m_empty: float) -> str | None:
    """Why f is undefined for these metric values (None when it is defined)."""
    if normalized_faithfulness(m_full, m_full, m_empty) is not None:
        return None
    return (
        f"f is undefined: the metric is the same with nothing and with everything ablated "
        f"(m(full) = {m_full:.6g}, m(empty) = {m_empty:.6g}), so the task shows no effect to explain"
    )


def format_f(value: float | None, digits: int = 4) -> str:
    """f for tables and titles: 'undefined' when it is None."""
    return "undefined" if value is None else f"{value:.{digits}f}"


def n_edges_for_percentage(percentage: float, n_edges: int) -> int:
    return min(n_edges, max(1, math.ceil(percentage / 100 * n_edges)))


def top_edges(scores: torch.Tensor, edge_mask: torch.Tensor, k: int, absolute: bool) -> torch.Tensor:
    """Bool mask of the k real edges with the highest (|score| or signed score); ties by index."""
    key = scores.abs() if absolute else scores
    key = torch.where(edge_mask, key.float(), torch.tensor(float("-inf"), device="cpu"))
    flat = key.flatten()
    # stable ordering makes circuits reproducible when scores tie
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.view_as(edge_mask) & edge_mask


def area_under(xs, ys) -> float:
    """Trapezoid rule on a linear x axis."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        total += (x1 - x0) * (y0 + y1) / 2
    return total


def cpr_cmd(curve_signed: list, curve_abs: list, percentages=MIB_PERCENTAGES) -> tuple[float | None, float | None]:
    """MIB areas: CPR = area under f (signed ranking), CMD = area under |1 - f| (absolute ranking);
    None when f is undefined."""
    if any(f is None for f in curve_signed) or any(f is None for f in curve_abs):
        return None, None
    xs = [p / 100 for p in percentages]
    cpr = area_under(xs, curve_signed)
    cmd = area_under(xs, [abs(1 - f) for f in curve_abs])
    return cpr, cmd


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (probability a true edge outranks a false one; ties count 1/2)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    s = torch.tensor(scores, dtype=torch.float64, device="cpu")
    ranks = average_ranks(s)
    y = torch.tensor(labels, dtype=torch.bool, device="cpu")
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `values` (float64), ties sharing the mean of their ranks (as scipy's rankdata)."""
    order = torch.argsort(values, stable=True)
    _, group, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # each tie group's last rank
    ranks = torch.empty(values.shape, dtype=torch.float64, device=values.device)
    ranks[order] = (last - (counts.double() - 1) / 2)[group]
    return ranks


# Scores are float32: differences below this fraction of the largest |score| are rounding, not ranking
# (an edge whose exact effect is 0 scores 1e-13 by one method and exactly 0 by another)
RANK_RESOLUTION = 1e-6


def spearman(a: torch.Tensor, b: torch.Tensor, resolution: float = RANK_RESOLUTION) -> float | None:
    """Spearman's rank correlation of two score vectors (average ranks for ties), after rounding
    each to `resolution` x its largest |value|; None when either is constant (no ranking)."""
    ranks = [average_ranks(_rounded(x.double().flatten(), resolution)) for x in (a, b)]
    centred = [r - r.mean() for r in ranks]
    norm = float(centred[0].norm() * centred[1].norm())
    if norm == 0.0:
        return None
    return float((centred[0] * centred[1]).sum()) / norm


def _rounded(x: torch.Tensor, resolution: float) -> torch.Tensor:
    step = float(x.abs().max()) * resolution if x.numel() else 0.0
    return torch.round(x / step) * step if step > 0 else x


def precision_recall(selected: set[str], true: set[str]) -> tuple[float, float]:
    hits = len(selected & true)
    precision = hits / len(selected) if selected else float("nan")
    recall = hits / len(true) if true else float("nan")
    return precision, recall


def against_known(known: list[str], names: list[str], scores: list[float], selected: set[str]) -> dict:
    """Precision and recall of the selected units, and ROC AUC of |score|, against the true units
    `known` (`names` and `scores`: every unit of the graph, in one order)."""
    true = set(known)
    precision, recall = precision_recall(selected, true)
    return {"precision": precision, "recall": recall, "roc_auc": roc_auc([abs(s) for s in scores], [n in true for n in names])}
