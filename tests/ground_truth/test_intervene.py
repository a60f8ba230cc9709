"""Interventions against ground truth: planted models whose mechanisms are known exactly, and
plain TransformerLens-hook references written here.

* copy_first: a0.h0 copies the first token onto its logit (the planted task); a0.h1 copies the
  second token onto its logit, which makes a second task that uses another head. Removing a0.h0
  destroys the first (f = 0) and leaves the second exactly as it was (f = 1); keeping the planted
  circuit keeps f >= 0.95, the number the faithfulness evaluation gives.
* mlp_neurons: neurons m0.n3 / m0.n7 classify the first token; removing them destroys the task.
* Edits baked into weights reproduce the in-memory intervention's logits (zero and
  position-independent mean ablation of heads, MLPs and neurons; LayerNorm models included).
* Per-example values, top-1 accuracy, the spurious ranking and the text loss equal plain references.
"""

from __future__ import annotations

import random

import pytest
import torch

from circuitctl.circuits.evaluator import CircuitEvaluator
from circuitctl.circuits.neurons import NeuronSpace
from circuitctl.circuits.nodes import NodeSpace
from circuitctl.config.schema import AblationConfig
from circuitctl.interventions.measure import TOP1_MARGIN, measure
from circuitctl.interventions.masks import mask_of
from circuitctl.interventions.weights import ablation_means, bake_refusal, weight_changes, weights_edited
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.patching.engine import PatchingEngine
from circuitctl.tasks.data import tokenize_pairs
from circuitctl.tasks.records import pair_from_record
from helpers import planted_module, second_token_records

pytestmark = pytest.mark.usefixtures("one_thread")
LOGIT_DIFF = METRICS.get("logit_diff")


def planted(name: str):
    """(PlantedCircuit, ModelAdapter) on the device tier's device: the one place this file builds models."""
    from testkit import DEVICE

    module = planted_module()
    pc = module.build(name)
    return pc, ModelAdapter(module.build_model(pc).to(DEVICE))


def answer_logits(model, data) -> torch.Tensor:
    """A plain forward pass's logits at the answer positions, on the model's device."""
    device = model.W_U.device
    with torch.no_grad():
        return model(data.clean.to(device))[torch.arange(data.n, device=device), data.answer_positions.to(device)]


def task_data(records: list[dict], adapter, origin: str = "test"):
    pairs = [pair_from_record(r, f"{origin} pair {i}") for i, r in enumerate(records)]
    return tokenize_pairs(pairs, None, adapter.d_vocab, None, origin)


def effect(space, keep, adapter, data, ablation="resample", metric=LOGIT_DIFF):
    return measure(space, keep, adapter, data, metric, AblationConfig(type=ablation), 8, "t", "t")


@pytest.mark.parametrize("ablation", ["resample", "zero"])
def test_removing_the_planted_head_destroys_its_task_and_leaves_the_other_head_s_task_intact(ablation):
    pc, adapter = planted("copy_first")
    space = NodeSpace(adapter.graph)
    keep = space.mask & ~mask_of(space, ["a0.h0"], "test")
    first = effect(space, keep, adapter, task_data(pc.pairs, adapter), ablation)
    second = effect(space, keep, adapter, task_data(second_token_records(), adapter), ablation)
    assert first.metric_before == pytest.approx(5.0) and first.accuracy_before == 1.0
    assert first.faithfulness == pytest.approx(0.0, abs=1e-6)
    assert first.accuracy_after == 0.0  # logit diff -5 (resample) or exactly 0 (zero): never a win
    assert second.metric_before == pytest.approx(2.0)
    assert second.metric_after == pytest.approx(second.metric_before, abs=1e-6)
    assert second.faithfulness == pytest.approx(1.0, abs=1e-6)
    assert second.accuracy_after == second.accuracy_before == 1.0
    assert second.top1_accuracy_after == second.top1_accuracy_before


def test_keeping_only_the_planted_circuit_keeps_f_as_the_faithfulness_evaluation_computes_it():
    pc, adapter = planted("copy_first")
    space = NodeSpace(adapter.graph)
    data = task_data(pc.pairs, adapter)
    keep = mask_of(space, ["input", "a0.h0"], "test")
    found = effect(space, keep, adapter, data)
    evaluator = CircuitEvaluator(space, adapter, data, LOGIT_DIFF, AblationConfig(type="resample"), 8)
    m_full, m_empty = evaluator.full_and_empty()
    m_circuit = float(evaluator.circuit_values(keep[None])[0])
    assert found.faithfulness >= 0.95
    assert found.faithfulness == pytest.approx((m_circuit - m_empty) / (m_full - m_empty), abs=1e-9)
    assert (found.metric_before, found.metric_empty) == pytest.approx((m_full, m_empty), abs=1e-9)


def test_removing_the_planted_neurons_destroys_the_task_and_keeping_them_keeps_it():
    pc, adapter = planted("mlp_neurons")
    space = NeuronSpace(adapter.graph, adapter.cfg.d_mlp)
    data = task_data(pc.pairs, adapter)
    planted_neurons = mask_of(space, ["m0.n3", "m0.n7"], "test")
    for ablation in ("resample", "zero", "mean"):
        removed = effect(space, space.mask & ~planted_neurons, adapter, data, ablation)
        kept = effect(space, planted_neurons, adapter, data, ablation)
        assert removed.faithfulness == pytest.approx(0.0, abs=1e-6), ablation
        assert removed.accuracy_after <= 0.5, ablation
        assert kept.faithfulness >= 0.95 and kept.accuracy_after == 1.0, ablation


def test_per_example_values_are_the_hooked_model_s_and_average_to_circuit_values():
    """Zero-ablating a head = zeroing its hook_z: a plain reference through TransformerLens hooks."""
    pc, adapter = planted("layernorm_mlp")
    data = task_data(pc.pairs, adapter)
    space = NodeSpace(adapter.graph)
    keep = space.mask & ~mask_of(space, ["a0.h0", "a1.h1"], "test")
    evaluator = CircuitEvaluator(space, adapter, data, LOGIT_DIFF, AblationConfig(type="zero"), 5)  # a short last batch
    values = evaluator.per_example_values(torch.stack([space.mask, keep]))
    assert values.shape == (2, data.n) and values.dtype == torch.float64

    def zero_heads(z, hook):
        heads = {0: [0], 1: [1]}[hook.layer()]
        z[:, :, heads] = 0
        return z

    model = adapter.model
    hooks = [(f"blocks.{layer}.attn.hook_z", zero_heads) for layer in (0, 1)]
    plain = answer_logits(model, data).cpu()
    with model.hooks(fwd_hooks=hooks):
        hooked = answer_logits(model, data).cpu()
    assert torch.allclose(values[0].float(), LOGIT_DIFF(plain, data), atol=1e-5)
    assert torch.allclose(values[1].float(), LOGIT_DIFF(hooked, data), atol=1e-5)
    assert not torch.allclose(values[0], values[1])  # the ablation matters
    assert values.mean(1).tolist() == pytest.approx(evaluator.circuit_values(torch.stack([space.mask, keep])).tolist(), abs=1e-12)


def test_top1_margin_is_positive_exactly_when_an_answer_is_the_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 3.0, 2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 5.5]])
    batch = type("B", (), {"answers": torch.tensor([[1, -1], [1, -1], [0, 1], [1, 0]])})()
    margin = TOP1_MARGIN(logits, batch)
    argmax_is_answer = [(row.argmax().item() in [a for a in answers.tolist() if a >= 0]) for row, answers in zip(logits, batch.answers)]
    assert (margin > 0).tolist() == argmax_is_answer == [True, False, True, False]


def _patched_logits(space, keep, adapter, data, ablation) -> torch.Tensor:
    """The in-memory intervention's logits at the answer positions [N, vocab]."""
    evaluator = CircuitEvaluator(space, adapter, data, LOGIT_DIFF, ablation, 64)
    rows = []
    for state in evaluator.engine.local_states():
        state = evaluator.patcher.prepare(state)
        rows.append(evaluator.patcher.logits(state, keep[None].to(adapter.device))[0].cpu())
    return torch.cat(rows)


def _exported_logits(tmp_path, adapter, changes, data) -> torch.Tensor:
    from circuitctl.interventions.weights import export_checkpoint
    from circuitctl.models.adapter import load_model

    export_checkpoint(tmp_path / "edited", adapter.model, changes, None, {"edits": sorted(changes)})
    return answer_logits(load_model(None, tmp_path / "edited", str(adapter.device)), data).cpu()


@pytest.mark.parametrize(
    "model, kind, names, ablation",
    [
        ("layernorm_mlp", "node", ["a0.h0", "a1.h1", "m0"], AblationConfig(type="zero")),
        ("layernorm_mlp", "node", ["a0.h1", "a1.h0", "m1"], AblationConfig(type="mean", per_position=False)),
        ("layernorm_mlp", "node", ["input"], AblationConfig(type="zero")),
        ("mlp_neurons", "neuron", ["m0.n3", "m0.n7", "m0.n11"], AblationConfig(type="zero")),
        ("mlp_neurons", "neuron", ["m0.n3", "m0.n0", "m0.n11"], AblationConfig(type="mean", per_position=False)),
    ],
)
def test_an_exported_checkpoint_reproduces_the_in_memory_intervention(tmp_path, model, kind, names, ablation):
    pc, adapter = planted(model)
    data = task_data(pc.pairs, adapter)
    space = NodeSpace(adapter.graph) if kind == "node" else NeuronSpace(adapter.graph, adapter.cfg.d_mlp)
    ablated = mask_of(space, names, "test")
    engine = PatchingEngine(adapter, data, LOGIT_DIFF, ablation, 8)
    changes = weight_changes(space, ablated, adapter.model, ablation_means(space, engine))
    in_memory = _patched_logits(space, space.mask & ~ablated, adapter, data, ablation)
    exported = _exported_logits(tmp_path, adapter, changes, data)
    clean = answer_logits(adapter.model, data).cpu()
    assert (in_memory - clean).abs().max() > 0.1  # the edit changes the logits
    assert (exported - in_memory).abs().max() <= 1e-5  # float32 rounding of a sum taken in another order
    with weights_edited(adapter.model, changes):  # the same edit applied in place ...
        inplace = answer_logits(adapter.model, data).cpu()
    assert torch.equal(inplace, exported)
    assert torch.equal(answer_logits(adapter.model, data).cpu(), clean)  # ... and undone exactly


def test_edits_that_no_weight_can_hold_are_refused():
    assert bake_refusal("node", AblationConfig(type="zero")) is None
    assert bake_refusal("neuron", AblationConfig(type="mean", per_position=False)) is None
    assert "resample" in bake_refusal("node", AblationConfig(type="resample"))
    assert "per-position" in bake_refusal("neuron", AblationConfig(type="mean"))
    assert "SAE features" in bake_refusal("feature", AblationConfig(type="zero"))
    assert "edges" in bake_refusal("edge", AblationConfig(type="zero"))


def test_spurious_ranking_finds_the_head_that_writes_the_spurious_answer():
    """SHIFT on heads: the intended answer is the first token (a0.h0), the spurious one the second
    (a0.h1). Ranked by their exact effect on the spurious metric, a0.h1 comes first; removing it
    removes the spurious behaviour and leaves the intended one exactly intact."""
    from circuitctl.interventions.spurious import spurious_importance

    _, adapter = planted("copy_first")
    records = second_token_records(spurious=True)
    session = _session(adapter, records)
    space = NodeSpace(adapter.graph)
    heads = [adapter.graph.upstream_index[h] for h in ("a0.h0", "a0.h1", "a0.h2")]
    importance = spurious_importance(space, heads, session, 8)
    assert importance[heads[1]] == pytest.approx(4.0)  # spurious logit diff +2 -> -2 (resample)
    assert importance[heads[0]] == pytest.approx(0.0, abs=1e-6) and importance[heads[2]] == pytest.approx(0.0, abs=1e-6)
    keep = space.mask & ~mask_of(space, ["a0.h1"], "test")
    intended = effect(space, keep, adapter, session.data)
    assert intended.faithfulness == pytest.approx(1.0, abs=1e-6) and intended.accuracy_after == 1.0


def _session(adapter, records):
    """A minimal session for the spurious ranking: config (ablation, task), task source, data, metric."""
    from circuitctl.config.load import validate_config
    from circuitctl.session import Session
    from circuitctl.tasks.records import TaskSource, TaskSpec

    pairs = tuple(pair_from_record(r, f"pair {i}") for i, r in enumerate(records))
    source = TaskSource(TaskSpec(name="spurious", pairs="pairs.jsonl"), pairs, "spurious")
    config = validate_config({"model": {"path": "unused"}, "task": {"path": "unused.jsonl"}, "method": {"name": "exact"}})
    return Session(config, adapter, tokenize_pairs(list(pairs), None, adapter.d_vocab, None, "spurious"), LOGIT_DIFF, source)


def test_text_loss_of_a_head_edit_equals_the_hooked_model_s_loss(tmp_path):
    from circuitctl.interventions.text import next_token_loss, read_tokens

    pc, adapter = planted("layernorm_mlp")
    rng = random.Random(3)
    lines = [[rng.randrange(adapter.d_vocab) for _ in range(rng.randint(3, 7))] for _ in range(9)]
    (tmp_path / "tokens.jsonl").write_text("\n".join(map(str, lines)) + "\n")
    tokens = read_tokens(tmp_path / "tokens.jsonl", adapter)
    space = NodeSpace(adapter.graph)
    changes = weight_changes(space, mask_of(space, ["a1.h0"], "test"), adapter.model, None)
    with weights_edited(adapter.model, changes):
        edited, n = next_token_loss(tokens, 4, lambda ids: adapter.model(ids.to(adapter.device)))

    def zero_head(z, hook):
        z[:, :, 0] = 0
        return z

    total, count = 0.0, 0
    with torch.no_grad():
        for row in lines:  # one sequence at a time, no padding: an independent reference
            ids = torch.tensor([row], device=adapter.device)
            logits = adapter.model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head)])
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
            count += len(row) - 1
    assert n == count
    assert edited == pytest.approx(total / count, rel=1e-5)


# -- SAE features (the SAEs trained on planted-mlp-neurons in tests/golden/v1/saes) ---------------
def feature_space(adapter):
    from pathlib import Path

    from circuitctl.circuits.features import FeatureSpace
    from circuitctl.sae.loading import resolve_saes

    found = resolve_saes(str(Path(__file__).resolve().parents[1] / "golden" / "v1" / "saes"), None, adapter.model, adapter.device)
    return FeatureSpace({s: sae for s, (sae, _) in found.items()}, {s.name: src for s, (_, src) in found.items()}, None)


def zero_features_hooks(space, removed: dict):
    """TransformerLens hooks that subtract removed features' decoder contributions at each site:
    decode(f with f_i = 0) + error = x - sum_i f_i(x) W_dec[i] (decode is affine)."""
    from circuitctl.models.sae_sites import hook_name

    hooks = []
    for site, features in removed.items():
        sae = space.saes[site]

        def hook(x, hook, sae=sae, features=features):
            f = sae.encode(x)[..., features]
            return x - f @ sae.decoder_matrix()[features]

        hooks.append((hook_name(site), hook))
    return hooks


def test_text_loss_of_a_feature_edit_equals_the_hooked_model_s_loss(tmp_path):
    from circuitctl.interventions.text import feature_edits, next_token_loss, read_tokens
    from circuitctl.models.sae_sites import SiteRunner

    pc, adapter = planted("mlp_neurons")
    space = feature_space(adapter)
    rng = random.Random(5)
    lines = [[rng.randrange(adapter.d_vocab) for _ in range(6)] for _ in range(10)]
    (tmp_path / "tokens.jsonl").write_text("\n".join(map(str, lines)) + "\n")
    tokens = read_tokens(tmp_path / "tokens.jsonl", adapter)
    by_name = {s.name: s for s in space.sites}
    names = ["mlp0/f3", "mlp0/f10", "resid0/f1", "attn0/f7"]
    keep = space.mask & ~mask_of(space, names, "test")
    session = _session(adapter, pc.pairs)
    session = type(session)(session.config.model_copy(update={"ablation": AblationConfig(type="zero")}), adapter, session.data, LOGIT_DIFF, session.task)
    runner = SiteRunner(adapter.model, space.saes)
    edits = feature_edits(space, keep, session.config.ablation, session, 4)
    edited, n = next_token_loss(tokens, 4, lambda ids: runner.forward(ids.to(adapter.device), None, edits))
    removed = {}
    for name in names:
        site, feature = name.split("/f")
        removed.setdefault(by_name[site], []).append(int(feature))
    ids = torch.tensor(lines, device=adapter.device)
    with torch.no_grad():
        plain = adapter.model(ids).float()
        hooked = adapter.model.run_with_hooks(ids, fwd_hooks=zero_features_hooks(space, removed)).float()
    reference = torch.nn.functional.cross_entropy(hooked[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    before = torch.nn.functional.cross_entropy(plain[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert n == ids[:, 1:].numel()
    assert edited == pytest.approx(float(reference), rel=1e-5)
    assert abs(edited - float(before)) > 1e-3  # the removed features matter


def test_spurious_importance_of_features_is_their_exact_single_ablation_effect():
    from circuitctl.interventions.spurious import spurious_importance

    pc, adapter = planted("mlp_neurons")
    space = feature_space(adapter)
    # a second answer set: the prompt's last token (a0.h1 copies it onto its logit) against the YES/NO answer
    records = [{**r, "spurious_answers": [r["clean"][-1]], "spurious_wrong_answers": r["answers"]} for r in pc.pairs]
    session = _session(adapter, records)
    session = type(session)(session.config.model_copy(update={"ablation": AblationConfig(type="zero")}), adapter, session.data, LOGIT_DIFF, session.task)
    sites = {s.name: s for s in space.sites}
    names = [f"{site}/f{i}" for site in ("attn0", "mlp0", "resid0") for i in range(0, 64, 9)]
    indices = [space.index_of(n) for n in names]
    importance = spurious_importance(space, indices, session, 8)
    spurious = task_data([{**r, "answers": r["spurious_answers"], "wrong_answers": r["spurious_wrong_answers"]} for r in records], adapter)
    full = LOGIT_DIFF(answer_logits(adapter.model, spurious).cpu(), spurious).double().mean()
    for name, index in zip(names, indices):
        site, feature = name.split("/f")
        with adapter.model.hooks(fwd_hooks=zero_features_hooks(space, {sites[site]: [int(feature)]})):
            ablated = LOGIT_DIFF(answer_logits(adapter.model, spurious).cpu(), spurious).double().mean()
        assert importance[index] == pytest.approx(float(full - ablated), abs=1e-4), name
    assert max(abs(v) for v in importance.values()) > 1e-2  # some features matter to the spurious answers


def test_every_tensor_an_intervention_creates_is_placed_on_purpose(tmp_path):
    """As tests/ground_truth/test_device_placement.py does for the methods: with the default device
    set to `meta`, a tensor created without a device fails where it meets the model's (as on a GPU)."""
    from test_device_placement import tensors_without_a_device_are_meta

    from circuitctl.interventions.spurious import spurious_importance
    from circuitctl.interventions.text import feature_edits, next_token_loss, read_tokens
    from circuitctl.models.sae_sites import SiteRunner

    pc, adapter = planted("mlp_neurons")
    data = task_data(pc.pairs, adapter)
    records = [{**r, "spurious_answers": [r["clean"][-1]], "spurious_wrong_answers": r["answers"]} for r in pc.pairs]
    session = _session(adapter, records)
    (tmp_path / "tokens.jsonl").write_text("[1, 2, 3, 4]\n[5, 6, 7]\n")
    spaces = {"node": NodeSpace(adapter.graph), "neuron": NeuronSpace(adapter.graph, adapter.cfg.d_mlp), "feature": feature_space(adapter)}
    keeps = {kind: space.mask & ~_second_unit(space) for kind, space in spaces.items()}  # the first node is `input`
    for ablation in ("resample", "zero", "mean"):
        for kind, space in spaces.items():
            with tensors_without_a_device_are_meta():
                effect(space, keeps[kind], adapter, data, ablation)
        engine = PatchingEngine(adapter, data, LOGIT_DIFF, AblationConfig(type=ablation, per_position=False), 8)
        with tensors_without_a_device_are_meta():
            if ablation != "resample":
                weight_changes(spaces["neuron"], ~keeps["neuron"], adapter.model, ablation_means(spaces["neuron"], engine))
                weight_changes(spaces["node"], ~keeps["node"], adapter.model, ablation_means(spaces["node"], engine))
    tokens = read_tokens(tmp_path / "tokens.jsonl", adapter)
    runner = SiteRunner(adapter.model, spaces["feature"].saes)
    with tensors_without_a_device_are_meta():
        spurious_importance(spaces["node"], [1, 2], session, 8)
        edits = feature_edits(spaces["feature"], keeps["feature"], AblationConfig(type="mean"), session, 8)
        next_token_loss(tokens, 2, lambda ids: runner.forward(ids.to(adapter.device), None, edits))


def _second_unit(space) -> torch.Tensor:
    one = torch.zeros(space.mask.numel(), dtype=torch.bool)
    one[1] = True
    return one.view_as(space.mask)
