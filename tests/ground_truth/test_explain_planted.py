"""Ground truth for `circuitctl explain`: the shipped planted models, whose mechanisms are known
exactly, and the shipped toy GPT's IOI circuit, analysed by hand in the README.

Every planted circuit here keeps every edge, so every distractor head is in the circuit: the
planted heads must get their planted roles and no distractor may."""

from __future__ import annotations

import json

import pytest

from explain_helpers import golden_run, planted_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("explain-planted")


def _explain(run_dir):
    from circuitctl.explain.pipeline import explain_run

    explain_run(run_dir)
    return json.loads((run_dir / "explanation.json").read_text())


def _roles(entry) -> dict[str, dict]:
    return {r["role"]: r for r in entry["roles"]}


@pytest.mark.parametrize("name", ["induction", "induction_soft"])
def test_previous_token_and_induction_heads(runs, name):
    explanation = _explain(planted_run(runs, name))
    nodes = explanation["nodes"]
    assert set(nodes) == {"a0.h0", "a0.h1", "a0.h2", "a1.h0", "a1.h1", "a1.h2"}  # distractors in the circuit
    assert [h for h, e in nodes.items() if "previous_token" in _roles(e)] == ["a0.h0"]
    assert [h for h, e in nodes.items() if "induction" in _roles(e)] == ["a1.h0"]
    assert _roles(nodes["a0.h0"])["previous_token"]["probe"] == "repeated_random"
    assert nodes["a0.h0"]["scores"]["previous_token"] > 0.99
    assert nodes["a1.h0"]["scores"]["induction"] > (0.99 if name == "induction" else 0.7)  # soft: ~0.8 of the attention
    assert nodes["a0.h0"]["attention"]["top_target"] == "previous"
    assert nodes["a1.h0"]["dla"]["difference"] > 3  # the induction head writes the answer (clean ~+5 / +3.66, corrupt 0)
    k_rows = [r for r in explanation["composition"] if r["kind"] == "K"]
    planted = [r for r in k_rows if r["edge"] == "a0.h0->a1.h0<k>"]
    assert planted and planted[0]["percentile"] == 100.0 and planted[0]["score"] > 0.2
    others = [r for r in k_rows if r["edge"] != "a0.h0->a1.h0<k>"]
    assert others and all(r["percentile"] < 50 and r["score"] < 0.01 for r in others)


def test_copy_head_attends_to_the_first_token(runs):
    nodes = _explain(planted_run(runs, "copy_first"))["nodes"]
    planted = nodes["a0.h0"]
    assert planted["attention"]["top_target"] == "first" and planted["attention"]["top_attention"] > 0.99
    assert {"copy", "mover"} <= set(_roles(planted)) and _roles(planted)["mover"]["target"] == "first"
    for distractor in ("a0.h1", "a0.h2"):  # they copy too (their weights do) but from elsewhere, and move nothing
        assert nodes[distractor]["attention"]["top_target"] != "first"
        assert "mover" not in _roles(nodes[distractor])
    assert planted["dla"]["clean"] == pytest.approx(5.0, abs=1e-4) and abs(nodes["a0.h1"]["dla"]["clean"]) < 1e-6


def test_distributed_heads_form_one_group(runs):
    explanation = _explain(planted_run(runs, "distributed"))
    groups = [g for g in explanation["groups"] if len(g["members"]) > 1]
    assert len(groups) == 1
    assert sorted(groups[0]["members"]) == [f"a0.h{h}" for h in range(6)]
    assert groups[0]["name"].startswith("mover->first (+): ")
    assert groups[0]["dla_clean"] == pytest.approx(3.0, abs=1e-4)  # six heads, +0.5 each
    for distractor in ("a0.h6", "a0.h7"):
        assert explanation["nodes"][distractor]["group"] not in {groups[0]["id"]}


def test_toy_ioi_labels_reproduce_the_hand_analysis(tmp_path):
    """README, "The demo": a1.h0, a1.h1, a1.h3 attend from the end to S2 and write against S."""
    run = golden_run(tmp_path, "demo")
    explanation = _explain(run)
    nodes = explanation["nodes"]
    for head in ("a1.h0", "a1.h1", "a1.h3"):
        attention = nodes[head]["attention"]
        assert attention["top_target"] == "S2" and attention["top_attention"] > 0.9
        assert _roles(nodes[head])["negative_mover"]["target"] == "S2"
        assert nodes[head]["dla"]["clean"] > 0.5  # IO - S: against S
    groups = [g for g in explanation["groups"] if len(g["members"]) > 1 and g["role"] == "negative_mover"]
    assert len(groups) == 1 and sorted(groups[0]["members"]) == ["a1.h0", "a1.h1", "a1.h3"]
    assert groups[0]["target"] == "S2" and groups[0]["dla_sign"] == "+"
    assert nodes["m1"]["dla"]["clean"] > 2  # the largest direct contribution
    # the README's figures (+1.00, +1.73, +1.31, m1 +3.76), from a plain TransformerLens cache:
    # each output at the end position, centred, divided by ln_final's scale, times its gain, read
    # by W_U[IO] - W_U[S], mean over the clean prompts
    reference = _toy_ioi_direct_logit_attribution(run)
    for name, readme in {"a1.h0": 1.00, "a1.h1": 1.73, "a1.h3": 1.31, "m1": 3.76}.items():
        assert nodes[name]["dla"]["clean"] == pytest.approx(reference[name], abs=1e-3)
        assert round(reference[name], 2) == readme


def _toy_ioi_direct_logit_attribution(run) -> dict[str, float]:
    import torch

    from circuitctl.config.load import load_config
    from circuitctl.session import open_session

    session = open_session(load_config(run / "config.yaml"), run)
    model, data = session.adapter.model, session.data
    with torch.no_grad():
        _, cache = model.run_with_cache(data.clean)
    rows, end = torch.arange(data.n), data.answer_positions.long()
    direction = (model.W_U[:, data.answers[:, 0]] - model.W_U[:, data.wrong[:, 0]]).T  # [N, d]
    scale = cache["ln_final.hook_scale"][rows, end]
    outputs = {f"a1.h{h}": cache["blocks.1.attn.hook_z"][rows, end, h] @ model.W_O[1, h] for h in (0, 1, 3)}
    outputs["m1"] = cache["blocks.1.hook_mlp_out"][rows, end]
    read = lambda x: float((((x - x.mean(-1, keepdim=True)) / scale * model.ln_final.w) * direction).sum(-1).mean())  # noqa: E731
    return {name: read(x) for name, x in outputs.items()}
