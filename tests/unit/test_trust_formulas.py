"""Pure functions behind per-example faithfulness, stability and compare: ranks and Spearman's
correlation, bootstrap means and intervals, Jaccard and per-example f,
each against a plain reference written here."""

from __future__ import annotations

import math
import random

import pytest
import torch

from circuitctl.analysis.bootstrap import percentile_interval, resample_indices, resampled_means
from circuitctl.analysis.compare import jaccard
from circuitctl.analysis.per_example import ExampleValues, confidence_intervals, example_faithfulness, summary
from circuitctl.analysis.stability import jaccard_matrix
from circuitctl.metrics.faithfulness import average_ranks, cpr_cmd, normalized_faithfulness, spearman


def plain_ranks(values: list[float]) -> list[float]:
    """Average ranks, 1-based, by counting: rank = (number smaller) + (number equal + 1) / 2."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def plain_pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@pytest.mark.parametrize("seed", range(5))
def test_average_ranks_and_spearman_equal_a_plain_implementation(seed):
    rng = random.Random(seed)
    a = [float(rng.randint(-3, 3)) for _ in range(40)]  # many ties
    b = [x + rng.choice([0.0, 1.0, -2.0]) for x in a]
    assert average_ranks(torch.tensor(a)).tolist() == plain_ranks(a)
    assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(plain_pearson(plain_ranks(a), plain_ranks(b)), abs=1e-12)


def test_spearman_of_monotone_reversed_and_constant_scores():
    x = torch.tensor([0.3, -1.0, 2.0, 0.0, 5.0])
    assert spearman(x, 3 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x.exp()) == pytest.approx(1.0)  # any increasing map
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.zeros(5)) is None  # no ranking: undefined, not 0


def test_spearman_ties_rounding_noise_with_exact_zeros():
    """One method scores an edge with no effect exactly 0, another 1e-13: the same ranking."""
    exact = torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, -0.5])
    noisy = torch.tensor([2.0, 1.0, 3e-13, -2e-13, 0.0, -0.5])
    assert spearman(exact, noisy) == pytest.approx(1.0)
    assert spearman(exact, noisy, resolution=0.0) < 0.99  # without the resolution the noise ranks


def test_resampled_means_equal_indexing_each_resample():
    values = torch.randn(3, 11, dtype=torch.float64)
    indices = resample_indices(11, 7, seed=4)
    expected = torch.stack([values[:, row].mean(1) for row in indices])
    assert torch.allclose(resampled_means(values, indices, chunk=3), expected, atol=1e-12)
    assert torch.equal(resample_indices(11, 7, seed=4), indices)  # reproducible from the seed
    assert not torch.equal(resample_indices(11, 7, seed=5), indices)


def test_percentile_interval():
    samples = [float(i) for i in range(101)]
    assert percentile_interval(samples) == pytest.approx([2.5, 97.5])
    assert percentile_interval([None, float("nan")]) is None
    assert percentile_interval([1.0, None, 1.0]) == [1.0, 1.0]


def test_jaccard_matrix_equals_sets():
    rng = random.Random(0)
    rows = [[rng.random() < 0.4 for _ in range(12)] for _ in range(5)] + [[False] * 12, [False] * 12]
    matrix = jaccard_matrix(torch.tensor(rows))
    sets = [{i for i, m in enumerate(r) if m} for r in rows]
    for i, a in enumerate(sets):
        for j, b in enumerate(sets):
            assert float(matrix[i, j]) == pytest.approx(jaccard(a, b))
    assert float(matrix[5, 6]) == 1.0  # two empty circuits are the same circuit


def values_of(full, empty, circuit, complement=None, curve=None) -> ExampleValues:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    n = len(full)
    curve = curve if curve is not None else [circuit, full]
    return ExampleValues(t(full), t(empty), t(circuit), t(complement or [0.0] * n), t(curve), t(curve))


def test_per_example_f_uses_each_examples_own_gap_and_leaves_tiny_gaps_undefined():
    v = values_of(full=[4.0, 2.0, 1.0, 3.0], empty=[0.0, 1.0, 1.0, -1.0], circuit=[3.0, 1.5, 5.0, 1.0])
    f = example_faithfulness(v)
    assert f[0] == 0.75 and f[1] == 0.5 and f[3] == 0.5
    assert math.isnan(f[2])  # gap 0: undefined, never 0


def test_summary_quantiles_ranking_and_worst_examples():
    rng = random.Random(1)
    n = 30
    full = [rng.uniform(1, 5) for _ in range(n)]
    empty = [rng.uniform(-1, 0) for _ in range(n)]
    circuit = [e + rng.uniform(-0.2, 1.1) * (m - e) for m, e in zip(full, empty)]
    full[3] = -0.5  # the model itself ranks example 3 wrong
    v = values_of(full, empty, circuit)
    record = summary(v, (v.full, v.circuit), "logit_diff > 0", lambda i: {"tokens": [i]})
    f = [(c - e) / (m - e) for m, e, c in zip(full, empty, circuit)]
    assert record["quantiles"]["50"] == pytest.approx(torch.tensor(f, dtype=torch.float64).quantile(0.5).item())
    right = [m > 0 for m in full]
    both = [r and c > 0 for r, c in zip(right, circuit)]
    assert record["ranking"]["n_model_right"] == sum(right) == n - 1
    assert record["ranking"]["fraction"] == pytest.approx(sum(both) / sum(right))
    worst = sorted(range(n), key=lambda i: f[i])[:5]
    assert [row["index"] for row in record["worst"]] == worst
    assert record["worst"][0]["tokens"] == [worst[0]] and record["worst"][0]["f"] == pytest.approx(f[worst[0]])


def test_bootstrap_intervals_equal_a_plain_bootstrap():
    """Each resample's f, completeness, CPR and CMD are the dataset formulas on the means of the
    resampled examples: the same as a loop that indexes the examples and calls the formulas."""
    rng = random.Random(2)
    n, points = 25, [0.1, 1, 10, 100]
    full = [rng.uniform(2, 4) for _ in range(n)]
    empty = [rng.uniform(-1, 0.5) for _ in range(n)]
    rows = lambda lo, hi: [rng.uniform(lo, hi) for _ in range(n)]  # noqa: E731
    curve = [rows(-1, 1), rows(0, 2), rows(1, 3), full]
    v = values_of(full, empty, rows(1, 4), rows(-0.5, 0.5), curve)
    record = confidence_intervals(v, points, n_resamples=200, seed=3)
    fs, cs, cprs, cmds = [], [], [], []
    for idx in resample_indices(n, 200, 3).tolist():
        mean = lambda x: sum(x[i] for i in idx) / n  # noqa: E731
        m_full, m_empty = mean(full), mean(empty)
        fs.append(normalized_faithfulness(mean(v.circuit.tolist()), m_full, m_empty))
        cs.append(normalized_faithfulness(mean(v.complement.tolist()), m_full, m_empty))
        curve_f = [normalized_faithfulness(mean(c), m_full, m_empty) for c in curve]
        cpr, cmd = cpr_cmd(curve_f, curve_f, points)
        cprs.append(cpr)
        cmds.append(cmd)
    for key, samples in (("faithfulness", fs), ("completeness", cs), ("cpr", cprs), ("cmd", cmds)):
        assert record[key] == pytest.approx(percentile_interval(samples), abs=1e-9), key
    assert record["faithfulness"][0] < record["faithfulness"][1]


def test_bootstrap_intervals_are_undefined_when_f_is():
    v = values_of(full=[1.0, 2.0, 3.0], empty=[1.0, 2.0, 3.0], circuit=[1.0, 0.0, 2.0])
    record = confidence_intervals(v, [1, 100], n_resamples=50, seed=0)
    assert record["faithfulness"] is None and record["cpr"] is None  # never an interval around 0
    per = summary(v, None, "no ranking", lambda i: {})
    assert per["n_undefined"] == 3 and per["quantiles"] is None and per["worst"] == []


def test_task_data_take_picks_examples_with_repeats():
    from circuitctl.tasks.data import TaskData

    n = 5
    data = TaskData(
        clean=torch.arange(n * 3).view(n, 3), corrupt=-torch.arange(n * 3).view(n, 3), lengths=torch.tensor([3, 2, 3, 1, 2]),
        answers=torch.arange(n)[:, None], wrong=torch.arange(n)[:, None] + 10, positions={"S": torch.tensor([0, 1, 2, 0, 1])},
    )
    picked = data.take(torch.tensor([4, 1, 1]))
    assert picked.n == 3
    assert picked.clean.tolist() == [data.clean[i].tolist() for i in (4, 1, 1)]
    assert picked.corrupt[0].tolist() == data.corrupt[4].tolist() and picked.lengths.tolist() == [2, 2, 2]
    assert picked.answers.flatten().tolist() == [4, 1, 1] and picked.wrong.flatten().tolist() == [14, 11, 11]
    assert picked.positions["S"].tolist() == [1, 1, 1]
