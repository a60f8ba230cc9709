"""Exact patching and EAP against ground truth: planted circuits and the flag-based reference."""

from __future__ import annotations

import pytest
import torch
from helpers import edge_auc, planted_context

from circuitctl.config.methods import EapSettings, ExactSettings
from circuitctl.errors import UsageError
from circuitctl.metrics.faithfulness import normalized_faithfulness
from circuitctl.methods import eap, exact

PLANTED = ["copy_first", "v_composition", "induction", "induction_soft", "mlp_neurons", "distributed", "layernorm_mlp"]


@pytest.mark.parametrize("name", ["v_composition", "layernorm_mlp", "induction_soft"])
def test_exact_patching_equals_the_flag_based_reference(name):
    from reference_patching import edge_effects, pair_tensors

    pc, context = planted_context(name, n_pairs=6)
    scores = exact.discover(context, ExactSettings(batch_size=4, candidates_per_pass=5)).scores
    clean, corrupt, answers, wrong = pair_tensors(pc.pairs)
    reference = edge_effects(context.adapter.model, clean, corrupt, answers, wrong)
    graph = context.graph
    for edge, effect in reference.items():
        # our score is an importance: minus the change of the logit difference
        assert float(scores[graph.edge_index(edge)]) == pytest.approx(-effect, abs=1e-4), edge


@pytest.mark.parametrize("name", PLANTED)
def test_exact_patching_ranks_the_planted_edges_first(name):
    pc, context = planted_context(name)
    scores = exact.discover(context, ExactSettings()).scores
    assert edge_auc(context.graph, scores, pc.true_edges) == 1.0


@pytest.mark.parametrize("name", ["copy_first", "v_composition", "distributed"])
def test_eap_equals_exact_patching_where_the_model_is_linear(name):
    _, context = planted_context(name)
    eap_scores = eap.discover(context, EapSettings()).scores
    exact_scores = exact.discover(context, ExactSettings()).scores
    assert torch.allclose(eap_scores, exact_scores, atol=1e-4)


@pytest.mark.parametrize("name", ["copy_first", "v_composition", "distributed", "induction_soft", "layernorm_mlp", "mlp_neurons"])
def test_eap_ranks_the_planted_edges_first_where_its_linear_approximation_holds(name):
    pc, context = planted_context(name)
    scores = eap.discover(context, EapSettings()).scores
    assert edge_auc(context.graph, scores, pc.true_edges) == 1.0


def test_eap_misses_edges_through_saturated_attention():
    """Documented limitation: with saturated attention the gradient through the key vanishes."""
    _, context = planted_context("induction")
    eap_scores = eap.discover(context, EapSettings()).scores
    exact_scores = exact.discover(context, ExactSettings()).scores
    for edge in ("a0.h0->a1.h0<k>", "input->a0.h0<v>"):
        index = context.graph.edge_index(edge)
        assert float(exact_scores[index]) > 1.0  # the edge carries the whole behaviour...
        assert abs(float(eap_scores[index])) < 1e-6  # ...and EAP sees none of it


CASES = [(name, "resample") for name in PLANTED] + [
    # the planted edges are defined by the clean/corrupt difference; under mean ablation
    # the induction models also need their query edges, so only the others are checked
    (name, "mean") for name in ("copy_first", "v_composition", "layernorm_mlp", "distributed")
]


@pytest.mark.parametrize("name, ablation", CASES)
def test_keeping_only_the_true_edges_keeps_the_behaviour(name, ablation):
    pc, context = planted_context(name, ablation=ablation)
    engine = context.engine(batch_size=8, keep_cache=True)
    m_full, m_empty = engine.full_and_empty()
    if abs(m_full - m_empty) < 1e-6:
        pytest.skip(f"{ablation} ablation removes no behaviour on {name}")
    keep = context.graph.edges_to_mask(pc.true_edges)
    m_circuit = float(engine.circuit_values(keep[None])[0])
    assert normalized_faithfulness(m_circuit, m_full, m_empty) >= 0.95


def test_eap_scores_do_not_depend_on_the_batch_size():
    _, context = planted_context("layernorm_mlp")
    a = eap.discover(context, EapSettings(batch_size=5)).scores
    b = eap.discover(context, EapSettings(batch_size=24)).scores
    assert torch.allclose(a, b, atol=1e-5)


def test_eap_refuses_kl_whose_gradient_vanishes_at_the_clean_run():
    _, context = planted_context("copy_first", metric="kl")
    with pytest.raises(UsageError, match="gradient"):
        eap.discover(context, EapSettings())


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_exact_patching_supports_every_ablation(ablation):
    from reference_patching import ReferencePatcher, logit_diff, pair_tensors

    pc, context = planted_context("layernorm_mlp", ablation=ablation)
    scores = exact.discover(context, ExactSettings()).scores
    # check one edge against the reference with the same ablation values
    engine = context.engine(batch_size=len(pc.pairs))
    state = next(engine.states())
    clean, corrupt, answers, wrong = pair_tensors(pc.pairs)
    patcher = ReferencePatcher(context.adapter.model)
    names = context.graph.upstream
    ablation_outputs = {name: state.ablation_outputs[i].expand_as(state.clean.outputs[i]) for i, name in enumerate(names)}
    edge = "a0.h0->m0"
    base = logit_diff(patcher.run(clean, set(), ablation_outputs=ablation_outputs), answers, wrong).mean()
    patched = logit_diff(patcher.run(clean, {edge}, ablation_outputs=ablation_outputs), answers, wrong).mean()
    assert float(scores[context.graph.edge_index(edge)]) == pytest.approx(-(float(patched) - float(base)), abs=1e-4)


@pytest.mark.parametrize("name", ["layernorm_mlp", "induction_soft", "mlp_neurons"])
def test_fast_eap_equals_eap_through_transformerlens_split_qkv_hooks(name):
    """Our EAP (no use_split_qkv_input) against gradients taken at TL's per-head input hooks."""
    from reference_patching import eap_scores, pair_tensors

    pc, context = planted_context(name, n_pairs=8)
    ours = eap.discover(context, EapSettings(batch_size=3)).scores
    clean, corrupt, answers, wrong = pair_tensors(pc.pairs)
    reference = eap_scores(context.adapter.model, clean, corrupt, answers, wrong)
    for edge, score in reference.items():
        assert float(ours[context.graph.edge_index(edge)]) == pytest.approx(-score, abs=1e-4), edge
