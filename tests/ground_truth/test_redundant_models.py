"""The OR-gate and backup-head planted models: mechanisms that single-edge scores cannot see.

* or_gate: two heads each detect a trigger; a saturating MLP readout needs either one. Ablating
  one OR-gate edge changes nothing, so exact single-edge patching and EAP score those edges 0
  and a circuit of the top |GT| edges by either score loses the behaviour.
* backup_head: a later head answers only when the primary head's output is missing (self-repair).
  Exact single-edge patching scores the primary's input edge 0 (the backup takes over), so its
  top-|GT| circuit loses the behaviour; EAP linearises at the clean run, where the backup is
  silent, so it does not see the self-repair and its top-|GT| circuit is faithful (documented).

Edge pruning, which optimises the whole circuit at once, keeps f >= 0.95 at the ground-truth size
on both. Everything is checked with the independent reference patcher (tests/reference_patching.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import REDUNDANT, build, build_model, planted_context, planted_settings
from reference_patching import ReferencePatcher, edge_effects, logit_diff, pair_tensors

from circuitctl.config.methods import EapSettings, ExactSettings
from circuitctl.methods import eap, edge_pruning, exact
from circuitctl.metrics.faithfulness import normalized_faithfulness, top_edges

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

OR_EDGES = {"input->a0.h0<v>", "input->a0.h1<v>", "a0.h0->m0", "a0.h1->m0"}


@functools.lru_cache(maxsize=None)
def measured(name: str) -> dict:
    pc = build(name)
    model = build_model(pc)
    clean, corrupt, answers, wrong = pair_tensors(pc.pairs)
    with torch.no_grad():
        full, empty = logit_diff(model(clean), answers, wrong).mean().item(), logit_diff(model(corrupt), answers, wrong).mean().item()
    return dict(pc=pc, model=model, clean=clean, corrupt=corrupt, answers=answers, wrong=wrong, full=full, empty=empty,
                effects=edge_effects(model, clean, corrupt, answers, wrong))


def reference_f(name: str, kept=None, ablated=None) -> float:
    """f of the reference patcher's run keeping only `kept` (or ablating only `ablated`)."""
    m = measured(name)
    patcher = ReferencePatcher(m["model"])
    with torch.no_grad():
        if kept is not None:
            logits = patcher.run_keeping(m["clean"], set(kept), corrupt_tokens=m["corrupt"])
        else:
            logits = patcher.run(m["clean"], set(ablated), corrupt_tokens=m["corrupt"])
    return normalized_faithfulness(logit_diff(logits, m["answers"], m["wrong"]).mean().item(), m["full"], m["empty"])


@pytest.mark.parametrize("name", sorted(REDUNDANT))
def test_the_true_edges_alone_keep_the_behaviour(name):
    m = measured(name)
    assert m["full"] - m["empty"] > 3.5
    assert reference_f(name, kept=m["pc"].true_edges) >= 0.95


def test_or_gate_single_ablations_change_under_5_percent_and_both_heads_destroy_it():
    m = measured("or_gate")
    gap = m["full"] - m["empty"]
    for edge in OR_EDGES:
        assert abs(m["effects"][edge]) < 0.05 * gap, edge
    assert reference_f("or_gate", ablated={"input->a0.h0<v>", "input->a0.h1<v>"}) < 0.1
    assert reference_f("or_gate", ablated={"a0.h0->m0", "a0.h1->m0"}) < 0.1


def test_backup_head_takes_over_when_the_primary_is_ablated():
    m = measured("backup_head")
    gap = m["full"] - m["empty"]
    assert abs(m["effects"]["input->a0.h0<v>"]) < 0.05 * gap  # self-repair: the backup answers instead
    assert -m["effects"]["a0.h0->logits"] > 0.9 * gap  # the backup still sees the primary's flag
    assert reference_f("backup_head", ablated={"input->a0.h0<v>", "input->a1.h0<v>"}) < 0.1  # both gone
    assert reference_f("backup_head", kept={"input->a1.h0<v>", "a1.h0->logits"}) >= 0.95  # the backup path alone


def _top_gt_f(context, scores, n: int) -> float:
    engine = context.engine(batch_size=24, keep_cache=True)
    m_full, m_empty = engine.full_and_empty()
    keep = top_edges(scores, context.graph.edge_mask, n, absolute=True)
    return normalized_faithfulness(float(engine.circuit_values(keep[None])[0]), m_full, m_empty)


def test_exact_patching_and_eap_score_the_or_gate_edges_zero_and_their_top_circuits_fail():
    pc, context = planted_context("or_gate")
    graph = context.graph
    for method, settings in ((exact, ExactSettings()), (eap, EapSettings())):
        scores = method.discover(context, settings).scores
        gap_edge = abs(float(scores[graph.edge_index("m0->logits")]))
        for edge in OR_EDGES:
            assert abs(float(scores[graph.edge_index(edge)])) < 1e-6 * gap_edge, (method.__name__, edge)
        # the weak negative heads' edges (|score| 0.1) outrank the OR-gate's: no tie decides this
        assert _top_gt_f(context, scores, len(pc.true_edges)) < 0.1, method.__name__


def test_exact_patching_misses_the_primary_head_of_a_self_repairing_circuit_and_eap_does_not():
    pc, context = planted_context("backup_head")
    exact_scores = exact.discover(context, ExactSettings()).scores
    eap_scores = eap.discover(context, EapSettings()).scores
    edge = context.graph.edge_index("input->a0.h0<v>")
    assert abs(float(exact_scores[edge])) < 1e-4
    assert _top_gt_f(context, exact_scores, len(pc.true_edges)) < 0.1
    # EAP's gradient at the clean run cannot see the backup (its softmax is saturated there)
    assert float(eap_scores[edge]) == pytest.approx(4.0, abs=1e-3)
    assert _top_gt_f(context, eap_scores, len(pc.true_edges)) >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REDUNDANT))
def test_edge_pruning_keeps_a_faithful_circuit_at_the_ground_truth_size(name):
    pc, context = planted_context(name)
    result = edge_pruning.discover(context, planted_settings(len(pc.true_edges)))
    assert int(result.membership.sum()) == len(pc.true_edges)
    engine = context.engine(batch_size=24, keep_cache=True)
    m_full, m_empty = engine.full_and_empty()
    f = normalized_faithfulness(float(engine.circuit_values(result.membership[None])[0]), m_full, m_empty)
    assert f >= 0.95
