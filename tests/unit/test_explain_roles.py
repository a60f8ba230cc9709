"""Unit tests of the explanation's pure parts: role scores on hand-made attention patterns and OV
matrices, attention summaries, groups, composition scores (against TransformerLens), direct
logit attribution (against the model's own logits) and escaping."""

from __future__ import annotations

import math

import pytest
import torch

from circuitctl.explain import attention as att
from circuitctl.explain import roles
from circuitctl.explain.groups import Member, group_nodes

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows_to_pattern(rows: list[list[float]]) -> torch.Tensor:
    """A causal [1, P, P] pattern from its rows (each row's keys 0..i)."""
    p = len(rows)
    pattern = torch.zeros(1, p, p)
    for i, row in enumerate(rows):
        pattern[0, i, : len(row)] = torch.tensor(row)
    return pattern


# -- attention roles ---------------------------------------------------------------------------
def test_previous_token_score_on_hand_made_patterns():
    tokens = torch.tensor([[0, 5, 6, 7, 8]])
    previous = _rows_to_pattern([[1], [1, 0], [0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1, 0]])
    self_attention = torch.eye(5)[None]
    uniform = _rows_to_pattern([[1.0 / (i + 1)] * (i + 1) for i in range(5)])
    mask = roles.previous_token_targets(tokens, first_query=2)  # queries 2..4 (their previous token is not BOS)
    assert float(roles.attention_score(previous, mask)) == pytest.approx(1.0)
    assert float(roles.attention_score(self_attention, mask)) == pytest.approx(0.0)
    assert float(roles.attention_score(uniform, mask)) == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)
    bos_sink = _rows_to_pattern([[1], [1, 0], [1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert float(roles.attention_score(bos_sink, mask)) == 0.0
    # with first_query=1 the query at 1 (previous token = BOS) counts, and a BOS sink gets 1/4
    assert float(roles.attention_score(bos_sink, roles.previous_token_targets(tokens, first_query=1))) == pytest.approx(0.25)


def test_duplicate_and_induction_targets_on_a_repeated_sequence():
    tokens = torch.tensor([[9, 1, 2, 3, 1, 2, 3]])  # prefix 9, then 1 2 3 twice
    dup = roles.duplicate_token_targets(tokens, first_key=1)
    ind = roles.induction_targets(tokens, first_key=1)
    assert dup[0].nonzero().tolist() == [[4, 1], [5, 2], [6, 3]]
    assert ind[0].nonzero().tolist() == [[4, 2], [5, 3], [6, 4]]  # the token after the earlier occurrence
    duplicate_head = torch.zeros(1, 7, 7)
    induction_head = torch.zeros(1, 7, 7)
    for i in range(7):
        duplicate_head[0, i, i - 3 if i >= 4 else 0] = 1
        induction_head[0, i, i - 2 if i >= 4 else 0] = 1
    assert float(roles.attention_score(duplicate_head, dup)) == 1.0
    assert float(roles.attention_score(duplicate_head, ind)) == 0.0
    assert float(roles.attention_score(induction_head, ind)) == 1.0
    assert float(roles.attention_score(induction_head, dup)) == 0.0
    half = 0.5 * duplicate_head + 0.5 * induction_head
    assert float(roles.attention_score(half, ind)) == pytest.approx(0.5)


def test_induction_target_never_the_query_itself_and_no_target_scores_zero():
    tokens = torch.tensor([[4, 4, 5]])  # a token repeated at i-1: its "next token" is the query itself
    assert not roles.induction_targets(tokens)[0, 1].any()
    no_repeats = torch.tensor([[1, 2, 3]])
    pattern = torch.eye(3)[None]
    assert float(roles.attention_score(pattern, roles.duplicate_token_targets(no_repeats))) == 0.0


def test_attention_score_of_several_heads_at_once():
    tokens = torch.tensor([[0, 1, 2, 1, 2]])
    mask = roles.induction_targets(tokens)
    heads = torch.stack([torch.eye(5)[None], torch.zeros(1, 5, 5)])
    heads[1, 0, 3, 2] = heads[1, 0, 4, 3] = 1
    assert roles.attention_score(heads, mask).tolist() == [0.0, 1.0]


# -- OV roles ----------------------------------------------------------------------------------
def _ov(W_E, W_V, W_O, W_U, tokens):
    return W_E[tokens] @ W_V @ W_O @ W_U[:, tokens]


def test_copy_scores_on_hand_made_ov_matrices():
    torch.manual_seed(0)
    V, d, e = 12, 16, 12
    W_E = torch.zeros(V, d)
    W_E[:, :V] = torch.eye(V)
    W_U = W_E.T.clone()
    tokens = torch.arange(V)
    k = roles.copy_k(V)
    identity_v = torch.zeros(d, e)
    identity_v[:V, :V] = torch.eye(V)
    identity_o = identity_v.T.clone()
    assert roles.copy_scores(_ov(W_E, identity_v, 3 * identity_o, W_U, tokens), tokens, k) == (1.0, 0.0)
    assert roles.copy_scores(_ov(W_E, identity_v, -3 * identity_o, W_U, tokens), tokens, k) == (0.0, 1.0)
    # a head that writes nothing copies nothing (ties count against the token)
    assert roles.copy_scores(_ov(W_E, identity_v, 0 * identity_o, W_U, tokens), tokens, k) == (0.0, 0.0)
    # a head that moves token t to t + 1 is no copy head
    shift = torch.roll(torch.eye(V), 1, dims=1)
    shifted_o = torch.zeros(e, d)
    shifted_o[:V, :V] = shift
    copy, negative = roles.copy_scores(_ov(W_E, identity_v, shifted_o, W_U, tokens), tokens, k)
    assert copy == 0.0 and negative == 0.0
    # a token-independent push (a bias raising token 0 for every input) is not copying
    biased = _ov(W_E, identity_v, identity_o, W_U, tokens) + torch.nn.functional.one_hot(torch.tensor(0), V) * 10
    assert roles.copy_scores(biased, tokens, k) == (1.0, 0.0)
    # half the tokens copied, the other half suppressed
    signs = torch.tensor([1.0] * 6 + [-1.0] * 6)
    assert roles.copy_scores(torch.diag(signs), tokens, k) == (0.5, 0.5)
    # a random OV circuit copies rarely
    random_logits = _ov(W_E, torch.randn(d, e), torch.randn(e, d), W_U, tokens)
    assert sum(roles.copy_scores(random_logits, tokens, k)) <= 0.5


def test_copy_k_and_listing_thresholds():
    assert roles.copy_k(12) == 1 and roles.copy_k(24) == 1 and roles.copy_k(512) == 25
    scores = {"previous_token": 0.9, "copy": 0.7, "mover": 0.49, "induction": 0.5}
    assert roles.listed_roles(scores) == ["induction", "previous_token", "copy"]  # most specific first
    assert roles.mover_scores(0.9, 1.0, 0.0) == (0.9, 0.0)


def test_ov_logits_of_a_planted_copy_head():
    from circuitctl.explain.ov import ov_logits
    from explain_helpers import planted_model

    model = planted_model("copy_first")
    tokens = torch.arange(model.cfg.d_vocab)
    logits = ov_logits(model, 0, 0, tokens)
    assert torch.allclose(logits, 5 * torch.eye(len(tokens)))  # a0.h0 copies with gain 5
    assert roles.copy_scores(logits, tokens, 1) == (1.0, 0.0)


# -- attention summaries -----------------------------------------------------------------------
def test_summary_of_attention_rows_targets_other_and_entropy():
    rows = torch.tensor([[0.1, 0.2, 0.0, 0.3, 0.4], [0.5, 0.0, 0.5, 0.0, 0.0]])  # two examples
    query = torch.tensor([4, 2])
    targets = att.target_positions(query, {"S": torch.tensor([1, 1])})
    means = att.summarize(rows, targets)
    assert float(means["S"]) == pytest.approx((0.2 + 0.0) / 2)
    assert float(means["first"]) == pytest.approx((0.1 + 0.5) / 2)
    assert float(means["previous"]) == pytest.approx((0.3 + 0.0) / 2)
    assert float(means["self"]) == pytest.approx((0.4 + 0.5) / 2)
    assert float(means["other"]) == pytest.approx((0.0 + 0.0) / 2)
    entropy = [-sum(p * math.log(p) for p in row if p > 0) for row in rows.tolist()]
    assert float(means["entropy"]) == pytest.approx(sum(entropy) / 2)


def test_top_target_prefers_labels_on_ties():
    means = {"end": 0.9, "first": 0.0, "previous": 0.05, "self": 0.9, "other": 0.05}
    assert att.top_target(means, ["end"]) == ("end", 0.9)
    assert att.top_target({"first": 0.2, "previous": 0.1, "self": 0.1, "other": 0.6}, []) == ("other", 0.6)


def test_movable_targets_skip_the_answer_position_and_fixed_tokens():
    tokens = torch.tensor([[0, 5, 7, 9], [0, 6, 7, 8]])
    answer = torch.tensor([3, 3])
    labels = {"A": torch.tensor([1, 1]), "B": torch.tensor([2, 2]), "end": torch.tensor([3, 3])}
    targets = att.target_positions(answer, labels)
    assert att.movable_targets(tokens, targets, answer, ["A", "B", "end"]) == ["A"]  # B holds 7 always; first holds 0


# -- groups ------------------------------------------------------------------------------------
def test_groups_by_role_target_and_sign():
    members = [
        Member("a1.h0", "negative_mover", "S2", 1.0),
        Member("a1.h3", "negative_mover", "S2", 1.3),
        Member("a1.h1", "negative_mover", "S2", -0.8),  # other sign
        Member("a0.h1", "copy", "other", 0.0),  # spread attention: no shared job
        Member("a0.h2", "copy", "other", 0.0),
        Member("a0.h3", None, "S1", 0.1),  # no role
        Member("m1", None, None, 3.0),
    ]
    groups = group_nodes(members)
    by_members = {tuple(g.members): g for g in groups}
    assert ("a1.h3", "a1.h0") in by_members
    assert by_members[("a1.h3", "a1.h0")].name == "negative_mover->S2 (+): a1.h3, a1.h0"
    assert by_members[("a1.h1",)].name == "negative_mover->S2 (-): a1.h1"
    assert {("a0.h1",), ("a0.h2",), ("a0.h3",), ("m1",)} <= set(by_members)
    assert groups[0].members == ["m1"] and groups[0].id == "g1"  # ids follow summed |DLA|
    assert sorted(m for g in groups for m in g.members) == sorted(m.name for m in members)


# -- composition -------------------------------------------------------------------------------
def test_composition_scores_equal_transformer_lens():
    from circuitctl.explain.composition import CompositionScores, percentile
    from testkit import random_model

    model = random_model(3, n_layers=3)
    scorer = CompositionScores(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    pairs = torch.tensor([[l1, h1, l2, h2] for l1 in range(L) for h1 in range(H) for l2 in range(l1 + 1, L) for h2 in range(H)])
    for kind in ("Q", "K", "V"):
        ours = scorer.scores(kind, pairs)
        theirs = model.all_composition_scores(kind).detach()
        expected = torch.tensor([float(theirs[l1, h1, l2, h2]) for l1, h1, l2, h2 in pairs.tolist()])
        assert torch.allclose(ours, expected, rtol=1e-4, atol=1e-6), kind
    assert scorer.pairs_at_distance(1, seed=0).shape == ((L - 1) * H * H, 4)
    assert percentile(0.5, torch.tensor([0.1, 0.2, 0.5, 0.9])) == 50.0


# -- direct logit attribution ------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["LN", "RMS", None])
def test_dla_of_every_component_sums_to_the_logit_difference(normalization):
    from circuitctl.explain import dla
    from circuitctl.explain.capture import capture_task
    from testkit import random_model, random_tokens

    model = random_model(1, normalization_type=normalization)
    tokens = random_tokens(6, 8, model.cfg.d_vocab, seed=2)
    answers, wrong = random_tokens(6, 2, model.cfg.d_vocab, seed=3), random_tokens(6, 1, model.cfg.d_vocab, seed=4)
    answer = torch.tensor([7, 5, 6, 7, 3, 7])
    L = model.cfg.n_layers
    cap = capture_task(model, tokens, answer[:, None], answer, set(range(L)), set(range(L)), ["hook_embed", "hook_pos_embed"], 4)
    direction = dla.logit_directions(model, answers, wrong)
    scale = dla.final_scale(model, cap.resid_final)
    total = dla.dla(cap.hooks["hook_embed"] + cap.hooks["hook_pos_embed"], direction, scale)
    for layer in range(L):
        total += dla.dla(cap.head_out[layer], direction, scale).sum(1) + dla.dla(cap.mlp_out[layer], direction, scale)
        total += dla.dla(model.blocks[layer].attn.b_O.detach()[None].expand(6, -1), direction, scale)
    # what no component writes: the final normalisation's bias and the unembedding's bias
    unembed_diff = model.W_U.T[answers].mean(1) - model.W_U.T[wrong].mean(1)
    bias = getattr(model.ln_final, "b", None) if normalization else None
    if bias is not None:
        total += unembed_diff.detach() @ bias.detach()
    total += model.b_U[answers].mean(1).detach() - model.b_U[wrong].mean(1).detach()
    with torch.no_grad():
        logits = model(tokens)[torch.arange(6), answer]
    expected = logits.gather(1, answers).mean(1) - logits.gather(1, wrong).mean(1)
    assert torch.allclose(total, expected, atol=1e-4)
    # per-neuron DLA sums to the MLP's DLA minus its output bias
    neurons = dla.neuron_dla(model, 0, cap.post[0], direction, scale).sum(1)
    b_out = dla.dla(model.blocks[0].mlp.b_out.detach()[None].expand(6, -1), direction, scale)
    assert torch.allclose(neurons + b_out, dla.dla(cap.mlp_out[0], direction, scale), atol=1e-5)


# -- escaping ----------------------------------------------------------------------------------
def test_markdown_and_graphviz_escaping():
    from circuitctl.explain.drawing import label, quote
    from circuitctl.explain.report import md

    nasty = 'a|b`c*<script>"x"\\n'
    escaped = md(nasty)
    assert "<script>" not in escaped and "\\|" in escaped and "\\`" in escaped and "\\*" in escaped
    q = quote(nasty)
    assert q.startswith('"') and q.endswith('"') and '\\"x\\"' in q and "\\\\n" in q
    assert label(["one", 'two "2"']) == '"one\\ntwo \\"2\\""'
