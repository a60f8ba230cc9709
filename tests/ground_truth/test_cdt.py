"""CD-T (contextual decomposition for transformers): decomposition rules and discovery."""

from __future__ import annotations

import functools

import pytest
import torch
from testkit import random_model, random_tokens
from helpers import edge_auc, planted_context

from circuitctl.config.methods import CdtSettings, ExactSettings
from circuitctl.methods import cdt, exact
from circuitctl.models.adapter import ModelAdapter
from circuitctl.methods.cdt.decomposition import Decomposer

MODELS = {
    "ln_mlp": lambda: random_model(0),
    "attn_only": lambda: random_model(1, attn_only=True, normalization_type=None, n_layers=3),
    "ln_pre": lambda: random_model(4, normalization_type="LNPre"),
    "parallel": lambda: random_model(2, parallel_attn_mlp=True),
    "rms_rotary_gated": lambda: random_model(
        3, normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4, act_fn="silu", gated_mlp=True
    ),
}


def _runs(model, n=4, length=7):
    adapter = ModelAdapter(model)
    clean = random_tokens(n, length, model.cfg.d_vocab, 0)
    corrupt = random_tokens(n, length, model.cfg.d_vocab, 1)
    positions = torch.tensor([length - 1, length - 2, length - 1, 3])[:n]
    return adapter, clean, corrupt, positions


RECONSTRUCTION = [(kind, "irrelevant", qk) for kind in sorted(MODELS) for qk in (None, "irrelevant_first", "reference")]
RECONSTRUCTION += [("ln_mlp", "proportional", qk) for qk in (None, "irrelevant_first")] + [("rms_rotary_gated", "proportional", None)]


@pytest.mark.parametrize("kind, bias, qk", RECONSTRUCTION)
def test_relevant_plus_irrelevant_reconstructs_every_activation(kind, bias, qk):
    """Both parts are propagated by their own rules; their sum must be TransformerLens's activation
    at every residual stream, attention output, MLP output and the logits, for every stream
    (float64, so that the check is tight: the parts are often much larger than their sum)."""
    model = MODELS[kind]().to(torch.float64)
    adapter, clean, corrupt, positions = _runs(model)
    decomposer = Decomposer(adapter, bias=bias, qk=qk)
    run = decomposer.full_run(clean, positions)
    deltas = adapter.run(clean, positions).outputs - adapter.run(corrupt, positions).outputs
    graph = adapter.graph
    sources = torch.eye(graph.n_upstream, dtype=torch.bool)
    sources[-1, 1] = True  # and one source set of two nodes
    out = decomposer.propagate(run, deltas, sources, carry=True, record=True)
    _, cache = model.run_with_cache(clean)
    L = model.cfg.n_layers
    sites = [f"blocks.{i}.hook_{s}" for i in range(L) for s in ("resid_pre", "attn_out", "mlp_out")]
    sites = [s for s in sites if s in out.records] + ["final"]
    assert len(sites) == (2 if model.cfg.attn_only else 3) * L + 1
    for site in sites:
        rel, irrel = out.records[site]
        actual = cache[site if site != "final" else f"blocks.{L - 1}.hook_resid_post"]
        scale = actual.abs().max()
        assert rel.abs().max() > 0 or site == "blocks.0.hook_resid_pre"
        assert ((rel + irrel) - actual[None]).abs().max() <= 1e-10 * scale, site
    logits = model(clean)[torch.arange(len(positions)), positions]
    assert ((out.rel + out.irrel) - logits[None]).abs().max() <= 1e-10 * logits.abs().max()
    # the fast path derives the irrelevant part from the full run instead of carrying it
    fast = decomposer.propagate(run, deltas, sources)
    assert (fast.rel - out.rel).abs().max() <= 1e-10 * logits.abs().max()


@pytest.mark.parametrize("qk", [None, "irrelevant_first", "reference"])
@pytest.mark.parametrize("kind", ["ln_mlp", "rms_rotary_gated"])
def test_position_windows_give_the_carried_result(kind, qk):
    """Per-position sources: the fast path computes only positions from the first source position
    to the last answer (queries after an offset, rotary included) and the last block at the answer
    rows, and derives the irrelevant part; the carried path does none of this."""
    model = MODELS[kind]().to(torch.float64)
    adapter, clean, corrupt, positions = _runs(model, length=9)
    decomposer = Decomposer(adapter, bias="proportional", qk=qk)
    run = decomposer.full_run(clean, positions)
    deltas = adapter.run(clean, positions).outputs - adapter.run(corrupt, positions).outputs
    U = adapter.graph.n_upstream
    streams = [(u, p) for u in range(U) for p in (4, 5, 6)]  # one example answers at 3: before them
    sources = torch.zeros(len(streams), U, dtype=torch.bool)
    at = torch.zeros(len(streams), clean.shape[1], dtype=torch.bool)
    for s, (u, p) in enumerate(streams):
        sources[s, u], at[s, p] = True, True
    fast = decomposer.propagate(run, deltas, sources, at)
    carried = decomposer.propagate(run, deltas, sources, at, carry=True)
    assert carried.rel.abs().max() > 1
    assert (fast.rel - carried.rel).abs().max() <= 1e-10 * carried.rel.abs().max()


@pytest.mark.parametrize("kind", ["attn_only", "no_norm_mlp", "no_norm_gated"])
def test_irrelevant_part_is_the_run_with_the_sources_ablated_without_normalization(kind):
    """Without normalization, irrelevant-first rules with biases to the irrelevant part make the
    irrelevant logits exactly those of the model with the source nodes patched to their
    reference output (node ablation), through MLPs and through queries and keys."""
    model = {
        "attn_only": lambda: random_model(1, attn_only=True, normalization_type=None, n_layers=3),
        "no_norm_mlp": lambda: random_model(5, normalization_type=None),
        "no_norm_gated": lambda: random_model(6, normalization_type=None, gated_mlp=True, act_fn="silu"),
    }[kind]()
    adapter, clean, corrupt, positions = _runs(model)
    graph = adapter.graph
    decomposer = Decomposer(adapter, bias="irrelevant", qk="irrelevant_first")
    clean_run, corrupt_run = adapter.run(clean, positions), adapter.run(corrupt, positions)
    U = graph.n_upstream
    sets = [[u] for u in range(U)] + [[1, graph.head_out_start[1] + 1], [0, U - 1]]
    sources = torch.zeros(len(sets), U, dtype=torch.bool)
    for s, members in enumerate(sets):
        sources[s, members] = True
    out = decomposer.propagate(decomposer.full_run(clean, positions), clean_run.outputs - corrupt_run.outputs, sources)
    ablated = sources[:, :, None] & graph.edge_mask[None]  # every edge out of a source node
    patched = adapter.patched_logits(clean_run, corrupt_run.outputs, ablated, positions)
    scale = patched.abs().max()
    assert (out.irrel - patched).abs().max() <= 1e-5 * scale
    assert (out.rel - (clean_run.logits[None] - patched)).abs().max() <= 1e-5 * scale


@functools.lru_cache(maxsize=None)
def _exact(name: str, ablation: str = "resample") -> torch.Tensor:
    _, context = planted_context(name, ablation=ablation)
    return exact.discover(context, ExactSettings()).scores


LINEAR_CASES = [
    ("copy_first", "resample", CdtSettings()),
    ("copy_first", "mean", CdtSettings(decompose_qk=True)),
    ("v_composition", "resample", CdtSettings(decompose_qk=True)),
    ("v_composition", "mean", CdtSettings()),
    ("v_composition", "resample", CdtSettings(per_position=False, sources_per_pass=5, batch_size=7)),
    ("distributed", "resample", CdtSettings()),
    ("distributed", "mean", CdtSettings(per_position=False)),
]


@pytest.mark.parametrize("name, ablation, settings", LINEAR_CASES)
def test_edge_scores_equal_exact_patching_on_models_linear_in_the_decomposed_path(name, ablation, settings):
    """Patterns fixed by position, no normalization: the metric is linear in every value path.
    (Zero ablation is not: zeroing the positional embedding moves the patterns.)"""
    _, context = planted_context(name, ablation=ablation)
    reference = _exact(name, ablation)
    assert reference.abs().max() > 0.04  # the planted edges carry an effect
    scores = cdt.discover(context, settings).scores
    assert torch.allclose(scores, reference, atol=1e-4), (scores - reference).abs().max()


def test_node_contributions_equal_exact_node_ablation():
    _, context = planted_context("v_composition")
    result = cdt.discover(context, CdtSettings())
    engine = context.engine(32)
    graph = context.graph
    ablated = torch.eye(graph.n_upstream, dtype=torch.bool)[:, :, None] & graph.edge_mask[None]
    effect = engine.clean_value() - engine.metric_values(ablated)  # importance for the logit difference
    for u, name in enumerate(graph.upstream):
        assert result.extra["node_scores"][name] == pytest.approx(float(effect[u]), abs=1e-4), name


# ROC AUC of |score| against the planted edges (reported in the README): 1.0 wherever the
# mechanism runs through values and MLPs. Through queries/keys (induction: K-composition) only
# with decompose_qk and the irrelevant-first rule.
AUC_WITHOUT_QK = {
    "copy_first": 1.0, "v_composition": 1.0, "mlp_neurons": 1.0, "distributed": 1.0, "layernorm_mlp": 1.0,
}


@pytest.mark.parametrize("name", sorted(AUC_WITHOUT_QK))
def test_cdt_recovers_value_path_circuits(name):
    pc, context = planted_context(name)
    result = cdt.discover(context, CdtSettings())
    assert edge_auc(context.graph, result.scores, pc.true_edges) == AUC_WITHOUT_QK[name]
    assert set(context.graph.mask_to_edges(result.membership)) == set(pc.true_edges)


@pytest.mark.parametrize("name", ["induction", "induction_soft"])
def test_k_composition_needs_decompose_qk(name):
    pc, context = planted_context(name)
    graph = context.graph
    k_edge = graph.edge_index("a0.h0->a1.h0<k>")
    plain = cdt.discover(context, CdtSettings())
    assert float(plain.scores[k_edge]) == 0.0  # the pattern is held at the full input's
    assert edge_auc(graph, plain.scores, pc.true_edges) < 0.7
    assert not plain.membership.any()  # a0.h0 contributes nothing without the key path
    reference_rule = cdt.discover(context, CdtSettings(decompose_qk=True, qk_rule="reference"))
    assert edge_auc(graph, reference_rule.scores, pc.true_edges) < 0.7
    with_qk = cdt.discover(context, CdtSettings(decompose_qk=True))
    assert edge_auc(graph, with_qk.scores, pc.true_edges) == 1.0
    assert set(graph.mask_to_edges(with_qk.membership)) == set(pc.true_edges)
    exact_scores = _exact(name)
    # the k edge alone: exact for saturated attention, ~2% low for the soft one (a projection)
    assert float(with_qk.scores[k_edge]) == pytest.approx(float(exact_scores[k_edge]), rel=0.03)


@pytest.mark.parametrize("metric", ["prob_diff", "kl"])
def test_other_metrics_rank_the_planted_edges_first(metric):
    pc, context = planted_context("layernorm_mlp", metric=metric)
    result = cdt.discover(context, CdtSettings())
    assert edge_auc(context.graph, result.scores, pc.true_edges) == 1.0
    assert result.extra["total_effect"] > 0  # removing the input's difference hurts


def test_proportional_bias_rule_of_the_paper_distorts_mlp_contributions():
    """The paper's rule gives the relevant part a share of b_in = -1 of the planted neurons:
    exact patching says 8, the proportional split 10 (still ranked first)."""
    pc, context = planted_context("mlp_neurons")
    edge = context.graph.edge_index("a0.h0->m0")
    assert float(cdt.discover(context, CdtSettings()).scores[edge]) == pytest.approx(8.0, abs=1e-4)
    proportional = cdt.discover(context, CdtSettings(bias="proportional"))
    assert float(proportional.scores[edge]) == pytest.approx(10.0, abs=1e-4)
    assert edge_auc(context.graph, proportional.scores, pc.true_edges) == 1.0


def test_discover_end_to_end_writes_the_native_circuit(tmp_path):
    import json

    import yaml

    from circuitctl.config.load import load_config
    from circuitctl.testing.planted import build, export
    from circuitctl.runner import discover

    pc = build("v_composition")
    export(pc, tmp_path / "model", tmp_path / "task")
    config = {
        "model": {"path": str(tmp_path / "model"), "device": "cpu"},
        "task": {"path": str(tmp_path / "task" / "task.yaml")},
        "method": {"name": "cdt", "threshold": 0.05},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    summary = discover(load_config(tmp_path / "cfg.yaml"), tmp_path)
    assert summary.n_in_circuit == len(pc.true_edges)
    assert summary.faithfulness == pytest.approx(1.0, abs=1e-4)
    circuit = json.loads((tmp_path / "run" / "circuit.json").read_text())
    assert circuit["results"]["node_scores"]["a0.h0"] == pytest.approx(10.0, abs=1e-3)
    in_graph = {name for name, edge in circuit["edges"].items() if edge["in_graph"]}
    assert in_graph == set(pc.true_edges)
