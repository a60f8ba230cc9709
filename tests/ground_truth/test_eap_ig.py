"""EAP-IG (inputs and activations variants) at edge, node and neuron level, against EAP and exact patching."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from testkit import random_model, random_tokens
from helpers import edge_auc, planted_context

from circuitctl.config.methods import METHODS, EapIgSettings, EapSettings, ExactSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import UsageError
from circuitctl.circuits.neurons import NeuronSpace
from circuitctl.circuits.nodes import NodeSpace
from circuitctl.methods import eap, eap_ig, exact
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.faithfulness import top_edges
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.testing.planted import PLANTED_NEURONS, build, export
from circuitctl.circuits.evaluator import CircuitEvaluator
from circuitctl.tasks.data import TaskData

VARIANTS = ("inputs", "activations")


def random_context(model, ablation="resample", n=6, length=7, seed=0):
    adapter = ModelAdapter(model)
    vocab = model.cfg.d_vocab
    data = TaskData(
        random_tokens(n, length, vocab, seed),
        random_tokens(n, length, vocab, seed + 1),
        torch.tensor([length, length - 1, length, length - 2, length, length][:n]),
        random_tokens(n, 1, vocab, seed + 2),
        random_tokens(n, 1, vocab, seed + 3),
        {},
    )
    return DiscoveryContext(adapter, data, METRICS.get("logit_diff"), AblationConfig(type=ablation))


MODELS = {
    "ln_mlp": lambda: random_model(0),
    "attn_only": lambda: random_model(1, attn_only=True, normalization_type=None, n_layers=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind, ablation", [("ln_mlp", "resample"), ("attn_only", "resample"), ("ln_mlp", "zero")])
def test_one_step_at_the_clean_point_is_eap(kind, ablation, variant):
    context = random_context(MODELS[kind](), ablation)
    reference = eap.discover(context, EapSettings(batch_size=4)).scores
    scores = eap_ig.discover(context, EapIgSettings(steps=1, variant=variant, batch_size=4, points="right")).scores
    scale = float(reference.abs().max())
    assert scale > 0.1
    # float32 rounding only (the activations variant re-sums the per-head outputs of each layer)
    assert torch.allclose(scores, reference, atol=1e-5 * scale, rtol=1e-5)


def test_the_interpolation_points_follow_the_reference():
    # current EAP-IG: alpha = k/m for k = 1..m (ends at the clean input); older: k = 0..m-1
    assert eap_ig.alphas(5, "right") == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert eap_ig.alphas(5, "left") == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert eap_ig.alphas(2, "midpoint") == [0.25, 0.75]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacking_steps_along_the_batch_does_not_change_the_scores(variant):
    context = random_context(MODELS["ln_mlp"]())
    one = eap_ig.discover(context, EapIgSettings(steps=3, variant=variant, batch_size=4, steps_per_pass=1)).scores
    stacked = eap_ig.discover(context, EapIgSettings(steps=3, variant=variant, batch_size=4, steps_per_pass=3)).scores
    assert torch.allclose(one, stacked, atol=1e-5 * float(one.abs().max()))


def _auc_above_float_noise(graph, scores, true_edges):
    """ROC AUC where scores below float32 resolution of the largest score count as zero."""
    floor = 1e-6 * float(scores.abs().max())
    return edge_auc(graph, torch.where(scores.abs() > floor, scores, torch.zeros_like(scores)), true_edges)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eap_ig_recovers_the_saturated_induction_circuit_that_eap_misses(variant):
    pc, context = planted_context("induction")
    eap_scores = eap.discover(context, EapSettings()).scores
    ig_scores = eap_ig.discover(context, EapIgSettings(variant=variant)).scores
    k_edge = context.graph.edge_index("a0.h0->a1.h0<k>")
    # EAP: the true key edge gets ~1e-23 (the softmax gradient vanishes), below float noise
    assert abs(float(eap_scores[k_edge])) < 1e-6
    assert _auc_above_float_noise(context.graph, eap_scores, pc.true_edges) < 1.0
    # EAP-IG (5 steps): the true edges get a clear share of their exact effect (5) and rank first
    assert float(ig_scores[k_edge]) > 0.3
    assert edge_auc(context.graph, ig_scores, pc.true_edges) == 1.0
    assert _auc_above_float_noise(context.graph, ig_scores, pc.true_edges) == 1.0
    top = set(context.graph.mask_to_edges(top_edges(ig_scores, context.graph.edge_mask, 3, absolute=True)))
    assert top == set(pc.true_edges)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name, tolerance", [("induction_soft", 0.003), ("induction", 0.01)])
def test_edge_scores_converge_to_the_exact_effects(name, tolerance, variant):
    """Along a straight path the integral is exact: the error shrinks with the number of steps."""
    _, context = planted_context(name, n_pairs=8)
    exact_scores = exact.discover(context, ExactSettings()).scores
    gap = float(exact_scores.abs().max())
    errors = []
    for steps in (4, 32):
        scores = eap_ig.discover(context, EapIgSettings(steps=steps, variant=variant, points="midpoint")).scores
        errors.append(float((scores - exact_scores).abs().max()) / gap)
    assert errors[1] < tolerance
    assert errors[1] < errors[0] / 4
    eap_error = float((eap.discover(context, EapSettings()).scores - exact_scores).abs().max()) / gap
    assert errors[1] < eap_error / 10


@pytest.mark.parametrize("variant", VARIANTS)
def test_neuron_attribution_finds_the_planted_neurons(variant):
    _, context = planted_context("mlp_neurons")
    result = eap_ig.discover(context, EapIgSettings(variant=variant, granularity="neuron"))
    scores = result.scores
    assert scores.shape == (1, context.adapter.cfg.d_mlp) and scores.dtype == torch.float32
    planted = set(PLANTED_NEURONS["mlp_neurons"][0])
    assert set(scores[0].abs().topk(len(planted)).indices.tolist()) == planted
    # the rest carry (numerically) nothing
    others = [i for i in range(scores.shape[1]) if i not in planted]
    assert float(scores[0, others].abs().max()) < 1e-4 * float(scores.abs().max())
    assert result.space.kind == "neuron"


def test_neuron_scores_match_exact_neuron_ablation_where_the_readout_is_linear():
    """Downstream of hook_post this model is linear, so delta x gradient is each neuron's exact effect."""
    _, context = planted_context("mlp_neurons")
    scores = eap_ig.discover(context, EapIgSettings(granularity="neuron", steps=2)).scores
    view = NeuronSpace(context.graph, context.adapter.cfg.d_mlp)
    evaluator = CircuitEvaluator(view, context.adapter, context.data, context.metric, context.ablation, 24)
    keep = view.mask[None].repeat(view.n_total, 1, 1)
    for k, (layer, i) in enumerate(view.mask.nonzero().tolist()):
        keep[k, layer, i] = False
    full, empty = evaluator.full_and_empty()
    assert (full, empty) == pytest.approx((4.0, -4.0), abs=1e-4)
    effects = -(evaluator.circuit_values(keep) - full)  # importance sign of logit_diff
    assert torch.allclose(scores.flatten().double(), effects, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_node_scores_sum_the_outgoing_edges_and_match_node_ablation_on_a_linear_model(variant):
    _, context = planted_context("copy_first")
    edges = eap_ig.discover(context, EapIgSettings(variant=variant, steps=3)).scores
    nodes = eap_ig.discover(context, EapIgSettings(variant=variant, steps=3, granularity="node")).scores
    assert torch.allclose(nodes, edges.sum(1), atol=1e-5)
    view = NodeSpace(context.graph)
    evaluator = CircuitEvaluator(view, context.adapter, context.data, context.metric, context.ablation, 24)
    full, _ = evaluator.full_and_empty()
    keep = ~torch.eye(view.n_total, dtype=torch.bool)
    effects = -(evaluator.circuit_values(keep) - full)
    assert torch.allclose(nodes.double(), effects, atol=1e-4)
    assert float(nodes[context.graph.upstream_index["a0.h0"]]) == pytest.approx(10.0, abs=1e-3)


def test_half_precision_models_accumulate_scores_in_float32():
    model32 = random_model(0)
    model16 = random_model(0).to(torch.bfloat16)
    scores32 = eap_ig.discover(random_context(model32), EapIgSettings(steps=3, batch_size=6)).scores
    scores16 = eap_ig.discover(random_context(model16), EapIgSettings(steps=3, batch_size=6)).scores
    assert scores16.dtype == torch.float32 and torch.isfinite(scores16).all()
    scale = float(scores32.abs().max())
    assert float((scores16 - scores32).abs().max()) < 0.1 * scale  # bf16 keeps ~3 significant digits


def test_settings_are_validated():
    info = METHODS.get("eap_ig")
    assert info.settings is EapIgSettings
    with pytest.raises(ValueError):
        EapIgSettings(steps=0)
    with pytest.raises(ValueError):
        EapIgSettings(granularity="head")
    with pytest.raises(ValueError):
        EapIgSettings(stepz=5)
    kl = random_context(MODELS["ln_mlp"]())
    kl.metric = METRICS.get("kl")
    with pytest.raises(UsageError, match="KL"):
        eap_ig.discover(kl, EapIgSettings(steps=1, points="right"))
    eap_ig.discover(kl, EapIgSettings(steps=2, batch_size=6))  # interpolated points have a gradient
    with pytest.raises(UsageError, match="attention-only"):
        eap_ig.discover(random_context(MODELS["attn_only"]()), EapIgSettings(granularity="neuron"))


# -- end to end: discover and evaluate faithfulness (the library functions behind the CLI) ----------
@pytest.fixture(scope="module")
def mlp_neurons_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("eap_ig_runs")
    planted = build("mlp_neurons")
    export(replace(planted, pairs=planted.pairs[:8]), work / "model", work / "task")
    return work


@pytest.mark.parametrize("granularity, top_n, unit_key", [("neuron", 2, "neurons"), ("node", 3, "nodes")])
def test_discover_and_evaluate_node_and_neuron_circuits(mlp_neurons_dir, granularity, top_n, unit_key):
    from circuitctl.config.load import load_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.runner import discover

    work = mlp_neurons_dir
    config_path = work / f"{granularity}.yaml"
    config_path.write_text(
        f"model: {{path: model}}\ntask: {{path: task}}\n"
        f"method: {{name: eap_ig, granularity: {granularity}, steps: 3}}\n"
        f"selection: {{top_n: {top_n}}}\noutput: {{dir: {work}/runs/{granularity}}}\n"
    )
    config = load_config(config_path, [])
    summary = discover(config, work)
    run = summary.run_dir
    assert summary.n_in_circuit == top_n and summary.faithfulness == pytest.approx(1.0, abs=1e-4)
    record = json.loads((run / "circuit.json").read_text())
    assert record["space"]["kind"] == granularity
    kept = {name for name, entry in record[unit_key].items() if entry["in_graph"] and name != "logits"}
    assert kept == ({"m0.n3", "m0.n7"} if granularity == "neuron" else {"input", "a0.h0", "m0"})
    assert record["results"]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert (run / "circuit.dot").is_file() and "m0" in (run / "circuit.dot").read_text()
    assert (run / "circuit.mib.json").is_file() == (granularity == "node")
    report, _ = evaluate_faithfulness(run, config, work, run, known=sorted(kept))
    saved = json.loads((run / "faithfulness.json").read_text())
    assert saved["unit"] == unit_key
    assert report.faithfulness == pytest.approx(1.0, abs=1e-4)
    assert report.completeness == pytest.approx(0.0, abs=1e-4)
    assert report.known_circuit["roc_auc"] == 1.0 and report.known_circuit["recall"] == 1.0


def test_default_points_follow_the_eap_ig_reference():
    """The reference integrates the inputs variant's edge scores at k/m, k = 0..m-1, and the
    activations variant and node scores at k = 1..m (issue 21)."""
    assert EapIgSettings().alpha_points == "left"
    assert EapIgSettings(granularity="neuron").alpha_points == "left"
    assert EapIgSettings(variant="activations").alpha_points == "right"
    assert EapIgSettings(granularity="node").alpha_points == "right"
    assert EapIgSettings(points="midpoint").alpha_points == "midpoint"
    assert eap_ig.alphas(5, "left") == [0.0, 0.2, 0.4, 0.6, 0.8]
    context = random_context(MODELS["ln_mlp"]())
    auto = eap_ig.discover(context, EapIgSettings(steps=3, batch_size=4))
    left = eap_ig.discover(context, EapIgSettings(steps=3, batch_size=4, points="left"))
    assert torch.equal(auto.scores, left.scores) and auto.extra["points"] == "left"
