"""Edge pruning: the masked forward pass, the hard-concrete masks, ground truth and resume.

The masked forward is checked against the patching engine (at binary masks it *is* edge
patching) and against EAP (its gradient at the all-ones mask is the EAP contraction). Edge
pruning itself is checked on the planted models: it recovers every planted circuit exactly at
its size, and keeps faithful circuits on the OR-gate and backup-head models where single-edge
scores fail (tests/ground_truth/test_redundant_models.py). Training settings for these tiny graphs are
chosen in `helpers.planted_settings` (see the README for why they differ from the reference's GPT-2 ones).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from testkit import random_model, random_tokens
from helpers import edge_auc, planted_context, planted_settings

from circuitctl.checkpoint import Checkpoint
from circuitctl.config.methods import EdgePruningSettings
from circuitctl.config.methods import EapSettings
from circuitctl.errors import InterruptedRun
from circuitctl.methods import eap, edge_pruning, hard_concrete
from circuitctl.methods.edge_pruning_forward import masked_logits
from circuitctl.models.adapter import ModelAdapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

PLANTED = ["copy_first", "v_composition", "induction", "induction_soft", "mlp_neurons", "distributed", "layernorm_mlp"]


# ------------------------------------------------------------------------------------------
# The masked forward pass
# ------------------------------------------------------------------------------------------
MODELS = {
    "ln_mlp": dict(),
    "attn_only": dict(attn_only=True, normalization_type=None, n_layers=3),
    "grouped_query": dict(n_heads=4, n_key_value_heads=2),
    "parallel": dict(parallel_attn_mlp=True),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_masked_forward_at_binary_masks_is_edge_patching(kind):
    model = random_model(0, **MODELS[kind])
    adapter = ModelAdapter(model)
    graph = adapter.graph
    tokens, corrupt = random_tokens(4, 6, 13, 1), random_tokens(4, 6, 13, 2)
    positions = torch.tensor([5, 4, 5, 3])
    clean = adapter.run(tokens, positions)
    ablation = adapter.run(corrupt, positions).outputs
    ablated = (torch.rand(3, graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(3)) < 0.3) & graph.edge_mask
    expected = adapter.patched_logits(clean, ablation, ablated, positions)
    with torch.no_grad():
        for k in range(3):
            torch.testing.assert_close(masked_logits(adapter, tokens, positions, ablation, (~ablated[k]).float()), expected[k], atol=1e-5, rtol=0)
        keep_all = torch.ones(graph.n_upstream, graph.n_downstream)
        torch.testing.assert_close(masked_logits(adapter, tokens, positions, ablation, keep_all), clean.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["layernorm_mlp", "induction_soft"])
def test_gradient_of_the_masked_forward_at_the_full_model_is_eap(name):
    """d mean(metric) / d keep[u, v] at keep = 1 is (clean - ablated output of u) . d metric / d input_v:
    minus the EAP contraction, computed by an independent code path (ModelAdapter.input_gradients)."""
    _, context = planted_context(name, n_pairs=8)
    graph = context.graph
    engine = context.engine(batch_size=8)
    state = next(engine.states())
    keep = torch.ones(graph.n_upstream, graph.n_downstream, requires_grad=True)
    with torch.enable_grad():
        logits = masked_logits(context.adapter, state.batch.clean, state.batch.answer_positions, state.ablation_outputs, keep)
        context.metric(logits, state.batch, state.clean.logits).mean().backward()
    eap_scores = eap.discover(context, EapSettings(batch_size=8)).scores
    torch.testing.assert_close(-context.metric.importance_sign * keep.grad * graph.edge_mask, eap_scores, atol=1e-5, rtol=1e-4)


def _reference_masked_logits(adapter, tokens, positions, ablation, keep):
    """The masked forward written plainly for the test: TransformerLens's per-head input and
    output hooks (`use_split_qkv_input`, `use_attn_result`), each reader's input minus
    sum_u (1 - keep[u, v]) * (current - ablated output of u), one edge at a time."""
    model, g = adapter.model, adapter.graph
    drop = (1 - keep) * g.edge_mask
    diffs: list[torch.Tensor] = []

    def mixed(x, v):
        return x - sum(drop[u, v] * diffs[u] for u in range(g.prefix_len[v]))

    def record_input(x, hook):
        diffs.append(x - ablation[0])

    def heads_in(channel):
        def hook_fn(x, hook):
            start = getattr(g, f"{channel}_in_start")[hook.layer()]
            return torch.stack([mixed(x[:, :, h], start + h) for h in range(x.shape[2])], dim=2)
        return hook_fn

    def heads_out(x, hook):
        lo = g.head_out_start[hook.layer()]
        diffs.extend(x[:, :, h] - ablation[lo + h] for h in range(x.shape[2]))

    def mlp_in(x, hook):
        return mixed(x, g.mlp_in_index[hook.layer()])

    def mlp_out(x, hook):
        diffs.append(x - ablation[g.mlp_out_index[hook.layer()]])

    def logits_in(x, hook):
        return mixed(x, g.logits_index)

    L = adapter.cfg.n_layers
    hooks = [("blocks.0.hook_resid_pre", record_input), (f"blocks.{L - 1}.hook_resid_post", logits_in)]
    for i in range(L):
        hooks += [(f"blocks.{i}.hook_{c}_input", heads_in(c)) for c in "qkv"]
        hooks += [(f"blocks.{i}.attn.hook_result", heads_out)]
        if g.spec.has_mlps:
            hooks += [(f"blocks.{i}.hook_mlp_in", mlp_in), (f"blocks.{i}.hook_mlp_out", mlp_out)]
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    if g.spec.has_mlps:
        model.set_use_hook_mlp_in(True)
    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)
        if g.spec.has_mlps:
            model.set_use_hook_mlp_in(False)
    return logits[torch.arange(len(tokens)), positions]


@pytest.mark.parametrize("kind", ["ln_mlp", "attn_only", "parallel"])
def test_masked_forward_and_its_gradient_match_a_plain_reference_at_fractional_masks(kind):
    """Between 0 and 1 every writer's output reaches later readers through the mixes, so the
    gradient with respect to `keep` goes through the whole chain of mixed inputs."""
    model = random_model(0, **MODELS[kind])
    adapter = ModelAdapter(model)
    graph = adapter.graph
    tokens, corrupt = random_tokens(3, 6, 13, 1), random_tokens(3, 6, 13, 2)
    positions = torch.tensor([5, 4, 3])
    ablation = adapter.run(corrupt, positions).outputs
    start = torch.rand(graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(4))
    results = []
    for forward in (masked_logits, _reference_masked_logits):
        keep = start.clone().to(adapter.device).requires_grad_(True)
        with torch.enable_grad():
            logits = forward(adapter, tokens, positions, ablation, keep)
            (logits.log_softmax(-1)[:, 0] - logits[:, 1]).sum().backward()
        results.append((logits.detach(), keep.grad * graph.edge_mask.to(keep.device)))
    (ours, our_grad), (plain, plain_grad) = results
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    assert plain_grad.abs().max() > 1e-3  # the reference really has gradients through the mixes
    torch.testing.assert_close(our_grad, plain_grad, atol=1e-5, rtol=1e-4)


def test_a_masked_pass_frees_its_graph_without_the_garbage_collector(monkeypatch):
    """No reference cycle through the autograd graph: a step's activations are freed when its
    outputs are (a cycle made edge pruning grow by 12 MB per step on the toy GPT)."""
    import gc
    import weakref

    from circuitctl.methods import edge_pruning_forward

    adapter = ModelAdapter(random_model(0))
    graph = adapter.graph
    tokens = random_tokens(2, 5, 13, 1)
    positions = torch.tensor([4, 4])
    ablation = adapter.run(random_tokens(2, 5, 13, 2), positions).outputs
    refs = []
    append = edge_pruning_forward._Writers.append

    def recording_append(self, block, *args):
        handle = append(self, block, *args)
        refs.extend(weakref.ref(t) for t in (block, handle) if t is not None)
        return handle

    monkeypatch.setattr(edge_pruning_forward._Writers, "append", recording_append)
    gc.disable()
    try:
        keep = torch.full((graph.n_upstream, graph.n_downstream), 0.7, requires_grad=True)
        with torch.enable_grad():
            masked_logits(adapter, tokens, positions, ablation, keep).sum().backward()
        assert refs and all(ref() is None for ref in refs)
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------
# Hard-concrete masks
# ------------------------------------------------------------------------------------------
def test_hard_concrete_samples_hit_zero_and_one_with_the_expected_probability():
    log_alpha = torch.full((200_000,), 0.7)
    z = hard_concrete.sample(log_alpha, torch.Generator().manual_seed(0))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    assert float((z > 0).float().mean()) == pytest.approx(float(hard_concrete.prob_nonzero(log_alpha[:1])), abs=0.005)


def test_binarize_keeps_the_expected_number_of_edges_with_the_largest_log_alphas():
    log_alpha = torch.tensor([[9.0, -9.0, 0.5], [-2.0, 8.0, -9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    keep = hard_concrete.binarize(log_alpha, mask)
    expected = round(float(hard_concrete.prob_nonzero(log_alpha)[mask].sum()))
    assert int(keep.sum()) == expected == 3
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_warm_start_follows_the_ranks_and_keeps_the_asked_fraction():
    scores = torch.tensor([0.0, -3.0, 1.0, 0.2, 2.5, -0.1, 0.7, 4.0])
    log_alpha = hard_concrete.warm_start(scores, keep_fraction=0.25)
    assert torch.equal(torch.argsort(log_alpha), torch.argsort(scores.abs()))
    noiseless = (torch.sigmoid(log_alpha / hard_concrete.TEMPERATURE) * 1.2 - 0.1).clamp(0, 1)
    assert float(noiseless.mean()) == pytest.approx(0.25, abs=0.02)


# ------------------------------------------------------------------------------------------
# Ground truth: the planted circuits
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", PLANTED)
def test_edge_pruning_recovers_every_planted_circuit(name):
    pc, context = planted_context(name)
    result = edge_pruning.discover(context, planted_settings(len(pc.true_edges)))
    kept = set(context.graph.mask_to_edges(result.membership))
    assert kept == set(pc.true_edges)  # precision and recall 1.0
    assert edge_auc(context.graph, result.scores, pc.true_edges) == 1.0


# ------------------------------------------------------------------------------------------
# Sweeps, warm starts, resume
# ------------------------------------------------------------------------------------------
def test_a_list_of_targets_is_a_sweep_of_independent_runs():
    pc, context = planted_context("copy_first", n_pairs=8)
    short = dict(steps=30, sparsity_warmup_steps=20, lr_warmup_steps=5, batch_size=4)
    sweep = edge_pruning.discover(context, planted_settings([2, 5], **short))
    assert [p.label for p in sweep.sweep] == ["edges-2", "edges-5"]
    alone = edge_pruning.discover(context, planted_settings(5, **short))
    assert torch.equal(sweep.sweep[1].scores, alone.scores) and torch.equal(sweep.sweep[1].membership, alone.membership)
    assert sweep.sweep[0].params == {"edges": 2}
    assert set(sweep.files) == {"edge_pruning_log.json"}


def test_init_from_another_method_sets_the_initial_log_alphas_by_its_ranks(monkeypatch):
    _, context = planted_context("v_composition", n_pairs=8)
    settings = planted_settings(3, steps=1, sparsity_warmup_steps=0, lr_warmup_steps=1, init_from="eap", init_sparsity=0.8)
    seen = {}
    original = edge_pruning._Pruner

    def spy(ctx, s, initial):
        seen["initial"] = initial.cpu()
        return original(ctx, s, initial)

    without = edge_pruning.discover(context, settings.model_copy(update={"init_from": None}))
    monkeypatch.setattr(edge_pruning, "_Pruner", spy)
    result = edge_pruning.discover(context, settings)  # lr factor 0 at step 0: the masks do not move
    mask = context.graph.edge_mask
    eap_result = eap.discover(context, EapSettings())
    eap_scores = eap_result.scores
    # the warm start's passes count: EAP's, plus the training's own
    assert result.forward_passes == pytest.approx(eap_result.forward_passes + without.forward_passes)
    initial = seen["initial"][mask]
    assert torch.equal(torch.argsort(initial, stable=True), torch.argsort(eap_scores[mask].abs(), stable=True))
    noiseless = (torch.sigmoid(initial / hard_concrete.TEMPERATURE) * 1.2 - 0.1).clamp(0, 1)
    assert float(noiseless.mean()) == pytest.approx(0.2, abs=0.03)


class Killed(Exception):
    """Stands in for SIGKILL: nothing catches it, so only the periodic checkpoints remain."""


@pytest.mark.parametrize("how", ["ctrl_c", "kill"])
def test_interrupted_edge_pruning_resumes_to_bit_identical_masks(how, tmp_path, monkeypatch):
    model = random_model(5)
    from circuitctl.config.schema import AblationConfig
    from circuitctl.methods.base import DiscoveryContext
    from circuitctl.metrics.metrics import METRICS
    from circuitctl.tasks.data import TaskData

    answers = random_tokens(10, 1, 13, 7)
    data = TaskData(random_tokens(10, 5, 13, 8), random_tokens(10, 5, 13, 9), torch.full((10,), 5), answers, (answers + 1) % 13, {})
    context = DiscoveryContext(ModelAdapter(model), data, METRICS.get("logit_diff"), AblationConfig(), seed=3)
    settings = EdgePruningSettings(
        edges=[20, 40], steps=12, sparsity_warmup_steps=8, lr_warmup_steps=2, batch_size=4, init_from="eap",
        checkpoint_every_seconds=0 if how == "kill" else 3600,
    )
    reference = edge_pruning.discover(context, settings)

    calls = {"n": 0, "stop": None}
    original = edge_pruning._step

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt if how == "ctrl_c" else Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(edge_pruning, "_step", counted)
    checkpoint = Checkpoint(tmp_path, "fingerprint")
    for attempt, stop in enumerate([5, 10]):  # stopped in the first target, then in the second
        calls.update(n=0, stop=stop)
        with pytest.raises(InterruptedRun if how == "ctrl_c" else Killed):
            edge_pruning.discover(replace(context, checkpoint=checkpoint, resume=attempt > 0), settings)
        assert checkpoint.exists
    calls.update(n=0, stop=None)
    resumed = edge_pruning.discover(replace(context, checkpoint=checkpoint, resume=True), settings)
    assert calls["n"] == 2 * 12 - (5 - 1) - (10 - 1)  # the finished steps were not run again
    assert len(reference.sweep) == 2
    for a, b in zip(reference.sweep, resumed.sweep, strict=True):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.membership, b.membership)
    assert resumed.files == reference.files
