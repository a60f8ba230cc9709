"""Planted-circuit models (circuitctl.testing.planted) checked against the reference patcher.

Two things are tested here:
* the reference edge-patching implementation (tests/reference_patching.py) agrees with plain
  TransformerLens activation patching wherever the two can be compared directly;
* every planted model's `true_edges` are exactly the edges that matter: each true edge moves the
  logit difference a lot when ablated alone, every other edge by ~0, and the true edges alone
  recover the full behaviour.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: reference_patching

from reference_patching import (  # noqa: E402
    ReferencePatcher,
    all_edges,
    eap_scores,
    edge_effects,
    logit_diff,
    node_outputs,
    pair_tensors,
    run_with_ablated_edges,
    run_with_kept_edges,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from circuitctl.graph.naming import parse_edge  # noqa: E402
from circuitctl.testing.planted import (  # noqa: E402
    PLANTED,
    PLANTED_NEURONS,
    PlantedCircuit,
    build,
    build_model,
    export,
)

NAMES = sorted(PLANTED)
TRUE_EDGE_MIN = 0.10  # a true edge moves the logit diff by > 10% of the clean-corrupt gap
OTHER_EDGE_MAX = 1e-4  # any other edge by < 1e-4 of the gap


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


@functools.lru_cache(maxsize=None)
def measured(name: str) -> dict:
    """Build a planted model once and measure everything the tests need."""
    pc = build(name)
    model = build_model(pc)
    clean, corrupt, answers, wrong = pair_tensors(pc.pairs)
    with torch.no_grad():
        ld_clean = logit_diff(model(clean), answers, wrong)
        ld_corrupt = logit_diff(model(corrupt), answers, wrong)
    effects = edge_effects(model, clean, corrupt, answers, wrong)
    return dict(
        pc=pc,
        model=model,
        clean=clean,
        corrupt=corrupt,
        answers=answers,
        wrong=wrong,
        ld_clean=ld_clean,
        ld_corrupt=ld_corrupt,
        gap=(ld_clean.mean() - ld_corrupt.mean()).item(),
        effects=effects,
    )


# --------------------------------------------------------------------------------------
# The reference implementation itself
# --------------------------------------------------------------------------------------


def _edges_into_head(cfg, layer: int, h: int) -> set[str]:
    return {e for e in all_edges(cfg) if parse_edge(e)[1].startswith(f"a{layer}.h{h}<")}


def _edges_out_of(cfg, node: str) -> set[str]:
    return {e for e in all_edges(cfg) if parse_edge(e)[0] == node}


def test_all_edges_grammar():
    cfg = HookedTransformerConfig(d_model=8, d_head=2, n_layers=1, n_ctx=4, n_heads=2, d_vocab=5, attn_only=True)
    assert all_edges(cfg) == [
        "input->a0.h0<q>",
        "input->a0.h0<k>",
        "input->a0.h0<v>",
        "input->a0.h1<q>",
        "input->a0.h1<k>",
        "input->a0.h1<v>",
        "input->logits",
        "a0.h0->logits",
        "a0.h1->logits",
    ]
    kw = dict(d_model=8, d_head=2, n_layers=2, n_ctx=4, n_heads=2, d_vocab=5, d_mlp=4, act_fn="relu")
    seq = set(all_edges(HookedTransformerConfig(**kw)))
    par = set(all_edges(HookedTransformerConfig(**kw, parallel_attn_mlp=True)))
    # heads feed the MLP of their own layer only in sequential blocks
    assert seq - par == {"a0.h0->m0", "a0.h1->m0", "a1.h0->m1", "a1.h1->m1"}
    assert "m0->a1.h1<k>" in seq and "m1->logits" in seq and "a1.h0->a1.h1<q>" not in seq
    assert "m0->m0" not in seq and "a1.h0->m0" not in seq
    # 6 upstream->downstream counts: layer-0 heads 2*3*1, m0 3, layer-1 heads 2*3*4, m1 6, logits 7
    assert len(seq) == 6 + 3 + 24 + 6 + 7


@pytest.mark.parametrize("name", NAMES)
def test_reference_extremes_and_decomposition(name):
    """No edge ablated == clean run, every edge ablated == corrupt run, outputs sum to the residual."""
    m = measured(name)
    model, clean, corrupt = m["model"], m["clean"], m["corrupt"]
    patcher = ReferencePatcher(model)
    with torch.no_grad():
        torch.testing.assert_close(patcher.run(clean, set(), corrupt_tokens=corrupt), model(clean), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            patcher.run(clean, set(all_edges(model.cfg)), corrupt_tokens=corrupt), model(corrupt), atol=1e-4, rtol=0
        )
        # ablating only the edges out of `input` is the same as running on the corrupt prompt
        torch.testing.assert_close(
            patcher.run(clean, _edges_out_of(model.cfg, "input"), corrupt_tokens=corrupt),
            model(corrupt),
            atol=1e-4,
            rtol=0,
        )
        # keeping nothing == ablating everything (through the functional wrappers)
        torch.testing.assert_close(run_with_kept_edges(model, clean, corrupt, set()), model(corrupt), atol=1e-4, rtol=0)
        torch.testing.assert_close(run_with_ablated_edges(model, clean, corrupt, set()), model(clean), atol=1e-5, rtol=0)
        # node outputs + biases == the final residual stream
        outs = node_outputs(model, clean)
        _, cache = model.run_with_cache(clean)
        total = sum(outs.values())
        for layer in range(model.cfg.n_layers):  # (MLP biases are inside hook_mlp_out already)
            total = total + model.blocks[layer].attn.b_O
        torch.testing.assert_close(total, cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_head_and_mlp_activation_patching(name):
    """Ablating every edge out of a node == patching that node's output with TransformerLens;
    ablating every edge into a head == the same (a head is a function of its q/k/v inputs)."""
    m = measured(name)
    model, clean, corrupt = m["model"], m["clean"], m["corrupt"]
    cfg = model.cfg
    patcher = ReferencePatcher(model)
    _, corrupt_cache = model.run_with_cache(corrupt)
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            for h in range(cfg.n_heads):

                def patch_z(z, hook, h=h):
                    z = z.clone()
                    z[:, :, h] = corrupt_cache[hook.name][:, :, h]
                    return z

                expected = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch_z)])
                out_edges = _edges_out_of(cfg, f"a{layer}.h{h}")
                in_edges = _edges_into_head(cfg, layer, h)
                torch.testing.assert_close(patcher.run(clean, out_edges, corrupt_tokens=corrupt), expected, atol=1e-4, rtol=0)
                torch.testing.assert_close(patcher.run(clean, in_edges, corrupt_tokens=corrupt), expected, atol=1e-4, rtol=0)
            if not cfg.attn_only:
                name_out = f"blocks.{layer}.hook_mlp_out"
                expected = model.run_with_hooks(clean, fwd_hooks=[(name_out, lambda x, hook: corrupt_cache[hook.name])])
                got = patcher.run(clean, _edges_out_of(cfg, f"m{layer}"), corrupt_tokens=corrupt)
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["v_composition", "induction_soft"])
def test_reference_single_edges_match_manual_qkv_patch(name):
    """In LayerNorm-free models, ablating a0.hX -> a1.hY<c> only changes head Y's c vector by
    (out_X[corrupt] - out_X[clean]) @ W_c[1][Y]: check that with a plain hook on hook_q/k/v."""
    m = measured(name)
    model, clean, corrupt = m["model"], m["clean"], m["corrupt"]
    cfg = model.cfg
    assert cfg.normalization_type is None and cfg.n_layers == 2
    patcher = ReferencePatcher(model)
    clean_out, corrupt_out = patcher.node_outputs(clean), patcher.node_outputs(corrupt)
    weights = {"q": model.blocks[1].attn.W_Q, "k": model.blocks[1].attn.W_K, "v": model.blocks[1].attn.W_V}
    with torch.no_grad():
        for x in range(cfg.n_heads):
            diff = corrupt_out[f"a0.h{x}"] - clean_out[f"a0.h{x}"]
            for y in range(cfg.n_heads):
                for c in "qkv":

                    def hook_fn(t, hook, y=y, c=c):
                        t = t.clone()
                        t[:, :, y] = t[:, :, y] + diff @ weights[c][y]
                        return t

                    expected = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.1.attn.hook_{c}", hook_fn)])
                    got = patcher.run(clean, {f"a0.h{x}->a1.h{y}<{c}>"}, corrupt_tokens=corrupt)
                    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_reference_reads_current_outputs_in_same_pass():
    """Ablating an early edge changes a later node's output, and a kept edge out of that later
    node must carry the *changed* output: in v_composition, ablating input->a0.h0<v> alone
    already flips the answer (a1.h0 then reads the corrupt token through its kept edges)."""
    m = measured("v_composition")
    assert m["effects"]["input->a0.h0<v>"] == pytest.approx(-m["gap"], rel=1e-4)
    patcher = ReferencePatcher(m["model"])
    with torch.no_grad():
        both = patcher.run(m["clean"], {"input->a0.h0<v>", "a1.h0->logits"}, corrupt_tokens=m["corrupt"])
    # ablating the downstream edge as well changes nothing more: the corrupt info is already there
    assert logit_diff(both, m["answers"], m["wrong"]).mean().item() == pytest.approx(m["ld_corrupt"].mean().item(), abs=1e-4)


# --------------------------------------------------------------------------------------
# The planted models
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_model_shape_and_pairs(name):
    pc = measured(name)["pc"]
    assert isinstance(pc, PlantedCircuit) and pc.name == name
    cfg = HookedTransformerConfig(**pc.config)
    assert cfg.d_model <= 64 and cfg.n_ctx <= 16 and cfg.d_vocab <= 64
    json.dumps(pc.config)  # JSON-serializable
    assert len(pc.pairs) >= 16
    lengths = {len(p["clean"]) for p in pc.pairs} | {len(p["corrupt"]) for p in pc.pairs}
    assert len(lengths) == 1 and lengths.pop() <= cfg.n_ctx
    for p in pc.pairs:
        assert set(p) == {"clean", "corrupt", "answers", "wrong_answers"}
        assert p["clean"] != p["corrupt"]
        assert all(0 <= t < cfg.d_vocab for t in p["clean"] + p["corrupt"] + p["answers"] + p["wrong_answers"])
    assert pc.true_edges <= set(all_edges(cfg))
    assert pc.notes and pc.description


@pytest.mark.parametrize("name", NAMES)
def test_mechanism_works(name):
    m = measured(name)
    # every clean prompt is answered correctly by a clear margin, the corrupt ones are not
    assert m["ld_clean"].min().item() > 2.0
    assert m["ld_corrupt"].max().item() < 0.5
    assert m["gap"] > 2.5


@pytest.mark.parametrize("name", NAMES)
def test_distractors_are_active(name):
    """Every head and MLP has a non-zero output at the scored position (distractors included)."""
    m = measured(name)
    outs = ReferencePatcher(m["model"]).node_outputs(m["clean"])
    for node, out in outs.items():
        assert out[:, -1].norm(dim=-1).min().item() > 0.1, node


@pytest.mark.parametrize("name", NAMES)
def test_true_edges_are_exactly_the_edges_that_matter(name):
    m = measured(name)
    pc, gap, effects = m["pc"], m["gap"], m["effects"]
    assert set(effects) == set(all_edges(m["model"].cfg))
    for e, eff in effects.items():
        if e in pc.true_edges:
            assert -eff > TRUE_EDGE_MIN * gap, (e, eff, gap)
        else:
            assert abs(eff) < OTHER_EDGE_MAX * gap, (e, eff, gap)


def test_distributed_contributions_are_small_and_equal():
    m = measured("distributed")
    true = sorted(m["pc"].true_edges)
    n = len({parse_edge(e)[0] for e in true if e.endswith("->logits")})  # contributing heads
    assert n >= 4 and len(true) == 2 * n  # input->head<v> and head->logits for each
    for e in true:
        # each single edge carries 1/n of the gap (= 1 logit), below a "+2" single-component threshold
        assert m["effects"][e] == pytest.approx(-m["gap"] / n, rel=1e-3)
        assert abs(m["effects"][e]) < 2.0
    assert m["gap"] == pytest.approx(n, rel=1e-3)  # ...while together they carry n logits


@pytest.mark.parametrize("name", NAMES)
def test_true_edges_alone_are_faithful(name):
    m = measured(name)
    patcher = ReferencePatcher(m["model"])
    with torch.no_grad():
        ld_circuit = logit_diff(
            patcher.run_keeping(m["clean"], m["pc"].true_edges, corrupt_tokens=m["corrupt"]), m["answers"], m["wrong"]
        ).mean()
    full, empty = m["ld_clean"].mean(), m["ld_corrupt"].mean()
    f = ((ld_circuit - empty) / (full - empty)).item()
    assert f >= 0.95, f


@pytest.mark.parametrize("name", sorted(PLANTED_NEURONS))
def test_planted_neurons(name):
    """Patching the planted neurons' activations with their corrupt values flips the answer;
    patching every other neuron changes nothing."""
    m = measured(name)
    model, clean, corrupt = m["model"], m["clean"], m["corrupt"]
    assert m["pc"].neurons == PLANTED_NEURONS[name]
    _, corrupt_cache = model.run_with_cache(corrupt)
    for layer, neurons in PLANTED_NEURONS[name].items():
        hook_name = f"blocks.{layer}.mlp.hook_post"
        others = [n for n in range(model.cfg.d_mlp) if n not in neurons]
        for subset, expected in ((neurons, m["ld_corrupt"].mean()), (others, m["ld_clean"].mean())):

            def patch(x, hook, subset=subset):
                x = x.clone()
                x[..., subset] = corrupt_cache[hook.name][..., subset]
                return x

            with torch.no_grad():
                ld = logit_diff(model.run_with_hooks(clean, fwd_hooks=[(hook_name, patch)]), m["answers"], m["wrong"])
            assert ld.mean().item() == pytest.approx(expected.item(), abs=1e-3 * m["gap"])


# --------------------------------------------------------------------------------------
# Attribution (EAP) behaviour documented in the notes
# --------------------------------------------------------------------------------------


def _eap(name):
    m = measured(name)
    return eap_scores(m["model"], m["clean"], m["corrupt"], m["answers"], m["wrong"]), m


@pytest.mark.parametrize("name", ["copy_first", "v_composition", "distributed"])
def test_attribution_is_exact_on_linear_models(name):
    eap, m = _eap(name)
    for e, exact in m["effects"].items():
        assert eap[e] == pytest.approx(exact, abs=1e-4 * m["gap"]), e


def test_attribution_fails_on_saturated_induction_but_not_on_soft():
    eap, m = _eap("induction")
    k_edge = "a0.h0->a1.h0<k>"
    assert m["effects"][k_edge] == pytest.approx(-m["gap"], rel=1e-4)  # exact: the whole gap
    assert abs(eap[k_edge]) < 1e-3 * m["gap"]  # gradient through the saturated softmax: ~0
    assert abs(eap["input->a0.h0<v>"]) < 1e-3 * m["gap"]
    eap_soft, m_soft = _eap("induction_soft")
    for e in m_soft["pc"].true_edges:
        assert eap_soft[e] < -0.5 * m_soft["gap"], e  # right sign, most of the effect


# --------------------------------------------------------------------------------------
# Registry and export
# --------------------------------------------------------------------------------------


def test_build_is_deterministic_and_registry():
    with pytest.raises(KeyError):
        build("no_such_model")
    a, b = build("induction"), build("induction")
    assert a.pairs == b.pairs and a.true_edges == b.true_edges
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trip(name, tmp_path):
    from safetensors.torch import load_file

    m = measured(name)
    pc = m["pc"]
    model_dir, task_dir = export(pc, tmp_path / "model", tmp_path / "task")
    config = json.loads((model_dir / "config.json").read_text())
    assert config == pc.config
    loaded = HookedTransformer(HookedTransformerConfig(**config))
    loaded.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(m["clean"]), m["model"](m["clean"]))
    task = yaml.safe_load((task_dir / "task.yaml").read_text())
    assert task == {
        "name": name,
        "version": 1,
        "description": pc.description,
        "pairs": "pairs.jsonl",
        "metric": "logit_diff",
    }
    records = [json.loads(line) for line in (task_dir / "pairs.jsonl").read_text().splitlines()]
    assert records == pc.pairs
