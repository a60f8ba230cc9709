"""The fast adapter against the slow flag-based reference (TransformerLens's own split-qkv hooks)."""

from __future__ import annotations

import copy

import pytest
import torch
from testkit import random_model, random_tokens

from circuitctl.models.adapter import ModelAdapter


def _setup(model, n=5, length=7, seed=0):
    adapter = ModelAdapter(model)
    clean = random_tokens(n, length, model.cfg.d_vocab, seed)
    corrupt = random_tokens(n, length, model.cfg.d_vocab, seed + 100)
    positions = torch.full((n,), length - 1)
    return adapter, clean, corrupt, positions


MODELS = {
    "ln_mlp": lambda: random_model(0),
    "attn_only": lambda: random_model(1, attn_only=True, normalization_type=None, n_layers=3),
    "parallel": lambda: random_model(2, parallel_attn_mlp=True),
    "rms_rotary": lambda: random_model(3, normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4, act_fn="silu", gated_mlp=True),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_patched_logits_match_reference(kind):
    from reference_patching import run_with_ablated_edges

    model = MODELS[kind]()
    adapter, clean, corrupt, positions = _setup(model)
    graph = adapter.graph
    clean_cap, corrupt_cap = adapter.run(clean, positions), adapter.run(corrupt, positions)
    masks = (torch.rand(4, graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(1)) < 0.3) & graph.edge_mask
    # also single late edges, which start the patched pass after layer 0
    late = torch.zeros(2, graph.n_upstream, graph.n_downstream, dtype=torch.bool)
    late[0, 1, graph.logits_index] = True
    late[1, graph.head_out_start[0], graph.q_in_start[1] + 1] = True
    masks = torch.cat([masks, late])
    ours = adapter.patched_logits(clean_cap, corrupt_cap.outputs, masks, positions)
    for k in range(masks.shape[0]):
        reference = run_with_ablated_edges(model, clean, corrupt, set(graph.mask_to_edges(masks[k])))[:, -1]
        assert torch.allclose(ours[k], reference, atol=1e-4), (kind, k, (ours[k] - reference).abs().max())


def test_nothing_ablated_is_clean_and_everything_ablated_is_corrupt(ln_mlp_model):
    adapter, clean, corrupt, positions = _setup(ln_mlp_model)
    graph = adapter.graph
    clean_cap, corrupt_cap = adapter.run(clean, positions), adapter.run(corrupt, positions)
    none = torch.zeros(1, graph.n_upstream, graph.n_downstream, dtype=torch.bool)
    assert torch.allclose(adapter.patched_logits(clean_cap, corrupt_cap.outputs, none, positions)[0], clean_cap.logits, atol=1e-5)
    everything = graph.edge_mask[None].clone()
    assert torch.allclose(adapter.patched_logits(clean_cap, corrupt_cap.outputs, everything, positions)[0], corrupt_cap.logits, atol=1e-4)


def test_node_outputs_sum_to_the_residual_stream(ln_mlp_model):
    adapter, clean, _, positions = _setup(ln_mlp_model)
    cap = adapter.run(clean, positions)
    biases = sum(block.attn.b_O for block in ln_mlp_model.blocks)
    assert torch.allclose(cap.outputs.sum(0) + biases, cap.resid[-1], atol=1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_input_gradients_match_split_qkv_flags(kind):
    """The fast path (no use_split_qkv_input) against TransformerLens's flag-based gradients."""
    model = MODELS[kind]()
    adapter, clean, _, positions = _setup(model)
    graph = adapter.graph
    answers = random_tokens(clean.shape[0], 1, model.cfg.d_vocab, 7)[:, 0]

    def objective(logits):
        return logits.gather(1, answers[:, None]).sum() - logits.logsumexp(-1).sum()

    _, _, per_layer = adapter.input_gradients(clean, positions, objective)
    ours = {}
    for inputs, grads in per_layer:
        for j, v in enumerate(inputs):
            ours[graph.downstream[v]] = grads[j]

    ref = copy.deepcopy(model)
    ref.set_use_split_qkv_input(True)
    if not model.cfg.attn_only:
        ref.set_use_hook_mlp_in(True)
    kept = {}

    def keep(x, hook):
        x.retain_grad()
        kept[hook.name] = x
        return x

    L = model.cfg.n_layers
    hooks = [(f"blocks.{i}.hook_{c}_input", keep) for i in range(L) for c in "qkv"]
    if not model.cfg.attn_only:
        hooks += [(f"blocks.{i}.hook_mlp_in", keep) for i in range(L)]
    hooks.append((f"blocks.{L - 1}.hook_resid_post", keep))
    with torch.enable_grad(), ref.hooks(fwd_hooks=hooks):
        ref.requires_grad_(True)
        objective(ref(clean)[:, -1]).backward()
    for i in range(L):
        for c in "qkv":
            g = kept[f"blocks.{i}.hook_{c}_input"].grad
            for h in range(model.cfg.n_heads):
                assert torch.allclose(ours[f"a{i}.h{h}<{c}>"], g[:, :, h], rtol=1e-4, atol=1e-4)
        if not model.cfg.attn_only:
            assert torch.allclose(ours[f"m{i}"], kept[f"blocks.{i}.hook_mlp_in"].grad, atol=1e-5)
    assert torch.allclose(ours["logits"], kept[f"blocks.{L - 1}.hook_resid_post"].grad, atol=1e-5)
