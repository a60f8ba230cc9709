from __future__ import annotations

import math

import pytest
import torch

from circuitctl.metrics.faithfulness import (
    area_under,
    cpr_cmd,
    n_edges_for_percentage,
    normalized_faithfulness,
    precision_recall,
    roc_auc,
    top_edges,
)


def test_normalized_faithfulness():
    assert normalized_faithfulness(5.0, 5.0, -5.0) == 1.0
    assert normalized_faithfulness(-5.0, 5.0, -5.0) == 0.0
    assert normalized_faithfulness(0.0, 5.0, -5.0) == 0.5
    assert normalized_faithfulness(1.0, 2.0, 2.0) is None


def test_roc_auc_counts_ties_as_half():
    assert roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert roc_auc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert roc_auc([3, 1, 2, 0], [True, True, False, False]) == 0.75


def test_cpr_and_cmd_are_trapezoid_areas():
    percentages = (0, 50, 100)
    cpr, cmd = cpr_cmd([0.0, 1.0, 1.0], [1.0, 1.0, 1.0], percentages)
    assert cpr == pytest.approx(0.75)
    assert cmd == 0.0
    assert area_under([0, 1], [2, 2]) == 2


def test_top_edges_respects_the_edge_mask_and_sign():
    scores = torch.tensor([[3.0, -5.0], [1.0, 0.5]])
    mask = torch.tensor([[True, True], [False, True]])
    assert top_edges(scores, mask, 1, absolute=True).tolist() == [[False, True], [False, False]]
    assert top_edges(scores, mask, 1, absolute=False).tolist() == [[True, False], [False, False]]
    assert int(top_edges(scores, mask, 10, absolute=True).sum()) == 3


def test_edge_counts_and_precision_recall():
    assert n_edges_for_percentage(0.1, 46) == 1
    assert n_edges_for_percentage(100, 46) == 46
    assert precision_recall({"a", "b"}, {"a", "c"}) == (0.5, 0.5)
