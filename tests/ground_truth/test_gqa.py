"""Grouped-query attention: k/v edges go to the shared KV group, with no per-head copies.

The oracle is an *ungrouped copy* of the same model (each KV head's weights repeated for every
head of its group, as TransformerLens's ``ungroup`` would), on which every method is already
checked against the flag-based reference. A grouped edge ``u->a{L}.g{G}<k>`` ablates what the
copy's edges ``u->a{L}.h{h}<k>`` for all heads h of group G ablate together.
"""

from __future__ import annotations

import copy

import pytest
import torch
from testkit import random_model, random_tokens

from circuitctl.config.methods import EapIgSettings, EapSettings, ExactSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph, GraphSpec
from circuitctl.graph.pruning import nodes_in, prune
from circuitctl.io.graphviz import to_dot
from circuitctl.methods import eap, eap_ig, exact
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.tasks.data import TaskData

SHAPES = {
    "ln_gelu": dict(n_heads=4, n_key_value_heads=2, n_layers=2),
    "llama_like": dict(
        n_heads=4, n_key_value_heads=1, n_layers=2, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=4, act_fn="silu", gated_mlp=True,
    ),
}


def models(kind: str):
    """(grouped model, its ungrouped copy with K/V weights repeated per head)."""
    overrides = SHAPES[kind]
    grouped = random_model(4, **overrides)
    plain = random_model(4, **{k: v for k, v in overrides.items() if k != "n_key_value_heads"})
    repeat = overrides["n_heads"] // overrides["n_key_value_heads"]
    state = {}
    for key, value in grouped.state_dict().items():
        if key.split(".")[-1] in ("_W_K", "_W_V", "_b_K", "_b_V"):
            key, value = key.replace("._", "."), value.repeat_interleave(repeat, dim=0)
        state[key] = value
    plain.load_state_dict(state, strict=True)
    return grouped, plain


def expand(grouped: Graph, plain: Graph, mask: torch.Tensor) -> torch.Tensor:
    """A grouped-graph edge mask [K, U, Vg] as the ungrouped copy's mask [K, U, Vu]."""
    to_plain = torch.zeros(grouped.n_downstream, plain.n_downstream)
    for v, name in enumerate(grouped.downstream):
        node = naming.parse_node(name)
        if node.kind == "group":
            for h in grouped.heads_of_kv_group(node.index):
                to_plain[v, plain.downstream_index[naming.head_input(node.layer, h, node.channel)]] = 1
        else:
            to_plain[v, plain.downstream_index[name]] = 1
    return (mask.float() @ to_plain) > 0


def task(vocab: int, n: int = 4, length: int = 6) -> TaskData:
    clean, corrupt = random_tokens(n, length, vocab, 0), random_tokens(n, length, vocab, 1)
    answers, wrong = random_tokens(n, 1, vocab, 2), random_tokens(n, 1, vocab, 3)
    return TaskData(clean, corrupt, torch.full((n,), length), answers, wrong, {})


def context(model) -> DiscoveryContext:
    adapter = ModelAdapter(model)
    return DiscoveryContext(adapter, task(model.cfg.d_vocab), METRICS.get("logit_diff"), AblationConfig())


# -- the graph ---------------------------------------------------------------------------
def test_grouped_graph_names_and_sizes():
    graph = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2))
    assert graph.downstream[:9] == [
        "a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>", "a0.g0<k>", "a0.g1<k>", "a0.g0<v>", "a0.g1<v>", "m0",
    ]
    assert len(graph.layer_inputs(1)) == 4 + 2 + 2 + 1
    assert graph.channel_inputs(1, "v") == range(graph.downstream_index["a1.g0<v>"], graph.downstream_index["a1.g1<v>"] + 1)
    assert [graph.kv_group_of_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert graph.readers_of_input(graph.downstream_index["a1.g1<k>"]) == ["a1.h2", "a1.h3"]
    assert graph.edge_index("a0.h3->a1.g1<v>") == (graph.upstream_index["a0.h3"], graph.downstream_index["a1.g1<v>"])
    assert graph.spec.to_dict()["n_kv_heads"] == 2
    # layer 0: 8 q/k/v inputs read `input`, m0 also its 4 heads; layer 1: 8 inputs read 6 outputs,
    # m1 also its 4 heads; the logits read all 11 outputs
    assert graph.n_edges == 8 * 1 + 5 + 8 * 6 + 10 + 11
    with pytest.raises(ValueError, match="k and v inputs only"):
        naming.parse_node("a0.g0<q>")
    with pytest.raises(ValueError, match="must divide"):
        GraphSpec(n_layers=1, n_heads=4, n_kv_heads=3)


def test_one_kv_head_per_head_keeps_the_mib_names():
    model = random_model(0, n_heads=3, n_key_value_heads=3)
    assert ModelAdapter(model).graph.downstream == ModelAdapter(random_model(0)).graph.downstream


def test_pruning_and_drawing_route_a_kv_group_to_its_heads():
    graph = Graph(GraphSpec(n_layers=2, n_heads=4, n_kv_heads=2, has_mlps=False))
    kept = ["input->a1.g1<k>", "a1.h3->logits", "input->a1.g0<v>"]  # group 0 feeds no head in the circuit
    membership = prune(graph.edges_to_mask(kept), graph)
    assert set(graph.mask_to_edges(membership)) == {"input->a1.g1<k>", "a1.h3->logits"}
    assert nodes_in(membership, graph) == {"input", "a1.h3", "logits"}
    dot = to_dot(graph, torch.ones(graph.n_upstream, graph.n_downstream), membership)
    assert '"a1.g1" -> "a1.h3"' in dot and '"a1.g1" -> "a1.h2"' not in dot


# -- the adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_patched_logits_match_the_ungrouped_copy(kind):
    grouped, plain = models(kind)
    ga, pa = ModelAdapter(grouped), ModelAdapter(plain)
    data = task(grouped.cfg.d_vocab)
    positions = data.answer_positions
    masks = (torch.rand(5, ga.graph.n_upstream, ga.graph.n_downstream, generator=torch.Generator().manual_seed(3)) < 0.3)
    masks &= ga.graph.edge_mask
    single = ga.graph.edges_to_mask(["a0.h1->a1.g0<k>"])  # one late edge: the patched pass starts at layer 1
    masks = torch.cat([masks, single[None]])
    g_clean, g_abl = ga.run(data.clean, positions), ga.run(data.corrupt, positions)
    p_clean, p_abl = pa.run(data.clean, positions), pa.run(data.corrupt, positions)
    assert torch.allclose(g_clean.logits, p_clean.logits, atol=1e-5)
    ours = ga.patched_logits(g_clean, g_abl.outputs, masks, positions)
    theirs = pa.patched_logits(p_clean, p_abl.outputs, expand(ga.graph, pa.graph, masks), positions)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def flag_patched_logits(model, graph: Graph, clean, corrupt, ablated: set[str]) -> torch.Tensor:
    """Edge patching through TransformerLens's own split-input hooks (hook_k_input has one entry
    per KV head for grouped-query attention): the slow reference, sharing no code with the adapter."""
    ref = copy.deepcopy(model)
    ref.set_use_split_qkv_input(True)
    ref.set_use_attn_result(True)
    ref.set_use_hook_mlp_in(True)
    L, H = ref.cfg.n_layers, ref.cfg.n_heads
    names = {"blocks.0.hook_resid_pre"} | {f"blocks.{i}.attn.hook_result" for i in range(L)} | {f"blocks.{i}.hook_mlp_out" for i in range(L)}
    _, cache = ref.run_with_cache(corrupt, names_filter=lambda n: n in names)

    def outputs(store, layer_hook, layer):
        if layer_hook == "result":
            return {naming.head(layer, h): store[:, :, h] for h in range(H)}
        return {naming.mlp(layer): store}

    abl = {naming.INPUT: cache["blocks.0.hook_resid_pre"]}
    for i in range(L):
        abl.update(outputs(cache[f"blocks.{i}.attn.hook_result"], "result", i))
        abl.update(outputs(cache[f"blocks.{i}.hook_mlp_out"], "mlp", i))
    into: dict[str, list[str]] = {}
    for e in ablated:
        u, v = naming.parse_edge(e)
        into.setdefault(v, []).append(u)
    current: dict[str, torch.Tensor] = {}

    def correction(v):
        return sum((abl[u] - current[u] for u in into.get(v, ())), torch.zeros(()))

    def record(kind, layer):
        def fn(x, hook):
            current.update(outputs(x, kind, layer) if kind != "input" else {naming.INPUT: x})
        return fn

    def patch(layer, channel):
        def fn(x, hook):
            x = x.clone()
            for i in range(x.shape[2]):  # H queries; one k / v input per KV head
                name = naming.head_input(layer, i, channel) if channel == "q" else naming.kv_group_input(layer, i, channel)
                x[:, :, i] += correction(name)
            return x
        return fn

    hooks = [("blocks.0.hook_resid_pre", record("input", 0))]
    for i in range(L):
        hooks += [(f"blocks.{i}.hook_{c}_input", patch(i, c)) for c in "qkv"]
        hooks += [(f"blocks.{i}.attn.hook_result", record("result", i)), (f"blocks.{i}.hook_mlp_out", record("mlp", i))]
        hooks.append((f"blocks.{i}.hook_mlp_in", lambda x, hook: x + correction(naming.mlp(hook.layer()))))
    hooks.append((f"blocks.{L - 1}.hook_resid_post", lambda x, hook: x + correction(naming.LOGITS)))
    with torch.no_grad():
        return ref.run_with_hooks(clean, fwd_hooks=hooks)[:, -1]


def test_patched_logits_match_the_flag_based_reference():
    grouped, _ = models("ln_gelu")
    adapter = ModelAdapter(grouped)
    graph = adapter.graph
    data = task(grouped.cfg.d_vocab, n=3)
    positions = data.answer_positions
    masks = (torch.rand(3, graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(5)) < 0.3) & graph.edge_mask
    clean, abl = adapter.run(data.clean, positions), adapter.run(data.corrupt, positions)
    ours = adapter.patched_logits(clean, abl.outputs, masks, positions)
    for k in range(masks.shape[0]):
        reference = flag_patched_logits(grouped, graph, data.clean, data.corrupt, set(graph.mask_to_edges(masks[k])))
        assert torch.allclose(ours[k], reference, atol=1e-4), (k, (ours[k] - reference).abs().max())


# -- the methods ---------------------------------------------------------------------------
def _group_sums(grouped: Graph, plain: Graph, plain_scores: torch.Tensor) -> torch.Tensor:
    """The ungrouped copy's scores summed over the heads of each KV group, on the grouped graph."""
    return plain_scores @ expand(grouped, plain, torch.eye(grouped.n_downstream, dtype=torch.bool)[None])[0].T.float()


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_eap_scores_are_the_ungrouped_scores_summed_over_each_group(kind):
    grouped, plain = models(kind)
    g_ctx, p_ctx = context(grouped), context(plain)
    ours = eap.discover(g_ctx, EapSettings(batch_size=3)).scores
    theirs = eap.discover(p_ctx, EapSettings(batch_size=3)).scores
    expected = _group_sums(g_ctx.graph, p_ctx.graph, theirs)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert float(ours.abs().max()) > 1e-2  # not trivially zero


@pytest.mark.parametrize("variant", ["inputs", "activations"])
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_eap_ig_scores_are_the_ungrouped_scores_summed_over_each_group(kind, variant):
    """k/v gradients are projected with the shared KV weights (one per group), not per head."""
    grouped, plain = models(kind)
    g_ctx, p_ctx = context(grouped), context(plain)
    settings = EapIgSettings(steps=3, variant=variant, batch_size=3)
    ours = eap_ig.discover(g_ctx, settings).scores
    theirs = eap_ig.discover(p_ctx, settings).scores
    expected = _group_sums(g_ctx.graph, p_ctx.graph, theirs)
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    assert float(ours.abs().max()) > 1e-2


def test_exact_scores_match_the_ungrouped_copy_with_the_whole_group_ablated():
    grouped, plain = models("ln_gelu")
    g_ctx, p_ctx = context(grouped), context(plain)
    gg, pg = g_ctx.graph, p_ctx.graph
    ours = exact.discover(g_ctx, ExactSettings(batch_size=3, candidates_per_pass=8)).scores
    # ablating u -> a{L}.g{G}<k> == ablating u -> a{L}.h{h}<k> for every head h of the group at once
    masks = torch.zeros(gg.n_edges, gg.n_upstream, gg.n_downstream, dtype=torch.bool)
    edges = gg.edge_mask.nonzero().tolist()
    for k, (u, v) in enumerate(edges):
        masks[k, u, v] = True
    engine = p_ctx.engine(batch_size=4)
    values = engine.metric_values(expand(gg, pg, masks), chunk=64)
    expected = torch.zeros_like(ours)
    for k, (u, v) in enumerate(edges):
        expected[u, v] = METRICS.get("logit_diff").importance_sign * (values[k] - engine.clean_value())
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    assert float(ours.abs().max()) > 1e-2
