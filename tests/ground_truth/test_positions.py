"""Per-position graphs: layout, edge rules, attribution (EAP-IG per token) and per-position patching."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from testkit import random_model, random_tokens
from helpers import planted_context

from circuitctl.config.methods import EapIgSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.naming import positioned
from circuitctl.graph.positional import PositionalGraph
from circuitctl.graph.positions import OTHER, PositionLayout
from circuitctl.circuits.positional import PositionalEdgeSpace
from circuitctl.methods import eap_ig
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.testing.planted import build, export
from circuitctl.models.unit_patching import positional_patched_logits
from circuitctl.circuits.evaluator import CircuitEvaluator
from circuitctl.tasks.data import TaskData


def labelled_context(model=None, n=6, length=8, seed=0):
    """Random prompts of lengths 6..8 with labels S (index 0..2), M (after S) and end (the last token)."""
    model = model or random_model(0)
    vocab = model.cfg.d_vocab
    lengths = torch.tensor([length, length - 1, length, length - 2, length, length - 1][:n])
    g = torch.Generator().manual_seed(seed)
    subject = torch.randint(0, 3, (n,), generator=g)
    middle = subject + 1 + torch.randint(0, 2, (n,), generator=g)
    data = TaskData(
        random_tokens(n, length, vocab, seed),
        random_tokens(n, length, vocab, seed + 1),
        lengths,
        random_tokens(n, 1, vocab, seed + 2),
        random_tokens(n, 1, vocab, seed + 3),
        {"end": lengths - 1, "S": subject, "M": middle},
    )
    return DiscoveryContext(ModelAdapter(model), data, METRICS.get("logit_diff"), AblationConfig())


def test_layout_groups_labelled_tokens_and_the_rest():
    data = labelled_context().data
    layout = PositionLayout.from_data(data)
    assert layout.names == ("S", "M", "end", OTHER)  # by mean position; unlabelled tokens last
    groups = layout.assign(data)
    rows = torch.arange(data.n)
    assert (groups[rows, data.positions["S"]] == 0).all() and (groups[rows, data.positions["end"]] == 2).all()
    assert ((groups == -1) == ~data.real_tokens).all()  # padding belongs to no group
    assert (groups[data.real_tokens] >= 0).all()


def test_layout_without_labels_uses_absolute_positions_of_equal_length_prompts():
    _, context = planted_context("v_composition")
    layout = PositionLayout.from_data(context.data)
    assert layout.names == ("t0", "t1", "t2", "t3", "t4", "end") and not layout.labelled and layout.answer == 5
    ragged = labelled_context().data
    ragged = TaskData(ragged.clean, ragged.corrupt, ragged.lengths, ragged.answers, ragged.wrong, {})
    with pytest.raises(UsageError, match="one token length"):
        PositionLayout.from_data(ragged)


def test_layout_rejects_ambiguous_labels():
    data = labelled_context().data
    clash = TaskData(data.clean, data.corrupt, data.lengths, data.answers, data.wrong, {**data.positions, "E2": data.positions["end"]})
    with pytest.raises(UsageError, match="same token"):
        PositionLayout.from_data(clash)
    reserved = TaskData(data.clean, data.corrupt, data.lengths, data.answers, data.wrong, {OTHER: data.positions["S"]})
    with pytest.raises(UsageError, match="reserved"):
        PositionLayout.from_data(reserved)


def test_edges_follow_causal_attention_and_names_round_trip():
    context = labelled_context()
    graph = context.graph
    pgraph = PositionalGraph.from_data(graph, context.data)
    S, M, END, REST = range(4)
    assert pgraph.reach[S, M] and not pgraph.reach[M, S] and not pgraph.reach[END, S]
    assert pgraph.reach[REST, S] and pgraph.reach[S, REST]  # unlabelled tokens lie on both sides
    assert pgraph.answer_groups.tolist() == [False, False, True, False]
    mask = pgraph.edge_mask
    u = graph.upstream_index["a0.h1"]
    k = graph.downstream_index["a1.h2<k>"]
    q = graph.downstream_index["a1.h2<q>"]
    m = graph.downstream_index["m1"]
    assert mask[S, END, u, k] and not mask[END, S, u, k]  # keys come from earlier positions
    assert mask[M, M, u, q] and not mask[S, M, u, q]  # queries from the same position only
    assert mask[M, M, u, m] and not mask[S, M, u, m]
    assert mask[END, END, u, graph.logits_index] and not mask[M, M, u, graph.logits_index]
    names = pgraph.edge_names()
    assert len(names) == pgraph.n_edges == len(set(names))
    for name in names[:: max(1, len(names) // 300)]:
        assert pgraph.edge_name(*pgraph.edge_index(name)) == name
        up, down = naming.parse_edge(name)  # the project's grammar parses every per-position name
        assert naming.parse_node(up).position and naming.parse_node(down).position
    assert positioned("a1.h2<k>", "end") == "a1.h2@end<k>"
    with pytest.raises(KeyError):
        pgraph.edge_index("a0.h1@end->a1.h2@S<k>")  # a key from a later position


@pytest.mark.parametrize("variant", ["inputs", "activations"])
def test_per_position_scores_sum_to_the_whole_graph_scores(variant):
    context = labelled_context()
    whole = eap_ig.discover(context, EapIgSettings(steps=2, variant=variant, batch_size=4)).scores
    result = eap_ig.discover(context, EapIgSettings(steps=2, variant=variant, batch_size=4, positions="per_token"))
    per_position = result.scores
    assert per_position.shape[:2] == (4, 4)
    assert result.space.info()["positions"]["names"] == ["S", "M", "end", OTHER]
    scale = float(whole.abs().max())
    assert torch.allclose(per_position.sum(dim=(0, 1)), whole, atol=1e-5 * scale)
    pgraph = PositionalGraph.from_data(context.graph, context.data)
    assert float(per_position[~pgraph.edge_mask].abs().max()) == 0.0


def test_per_position_patching_agrees_with_edge_patching():
    """A base edge ablated at every position pair is the ordinary edge ablation; none is clean, all is corrupt."""
    context = labelled_context()
    graph = context.graph
    pgraph = PositionalGraph.from_data(graph, context.data)
    state = next(iter(context.engine(6).states()))
    groups = pgraph.layout.assign(state.batch)
    generator = torch.Generator().manual_seed(3)
    base = (torch.rand(4, graph.n_upstream, graph.n_downstream, generator=generator) < 0.2) & graph.edge_mask
    per_position = pgraph.edge_mask[None] & base[:, None, None]
    nothing = torch.zeros_like(per_position[:1])
    everything = pgraph.edge_mask[None]
    ours = positional_patched_logits(
        context.adapter, state.clean, state.ablation_outputs, torch.cat([per_position, nothing, everything]), groups,
        state.batch.answer_positions,
    )
    reference = context.adapter.patched_logits(state.clean, state.ablation_outputs, base, state.batch.answer_positions)
    assert torch.allclose(ours[:4], reference, atol=1e-4)
    assert torch.allclose(ours[4], state.clean.logits, atol=1e-5)
    corrupt = context.adapter.run(state.batch.corrupt, state.batch.answer_positions).logits
    assert torch.allclose(ours[5], corrupt, atol=1e-4)


def test_per_position_attribution_equals_per_position_patching_on_a_linear_model():
    """v_composition's patterns are positional, so delta x gradient is exact per position too."""
    _, context = planted_context("v_composition")
    result = eap_ig.discover(context, EapIgSettings(steps=1, positions="per_token"))
    view = PositionalEdgeSpace(PositionalGraph.from_data(context.graph, context.data))
    scores = result.scores
    top = scores.abs().flatten().topk(3).indices
    top_names = {view.pgraph.edge_name(*map(int, torch.unravel_index(i, scores.shape))) for i in top}
    assert top_names == {"input@t0->a0.h0@t1<v>", "a0.h0@t1->a1.h0@end<v>", "a1.h0@end->logits@end"}
    # per-edge ablation effects for the top edges and a sample of the others
    edges = view.mask.nonzero()
    order = scores[view.mask].abs().argsort(descending=True)
    picked = torch.cat([order[:6], order[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))[:10]]])
    keep = view.mask[None].repeat(len(picked), 1, 1, 1, 1)
    for k, i in enumerate(picked.tolist()):
        keep[(k, *edges[i].tolist())] = False
    evaluator = CircuitEvaluator(view, context.adapter, context.data, context.metric, context.ablation, 24)
    full, empty = evaluator.full_and_empty()
    assert (full, empty) == pytest.approx((5.0, -5.0), abs=1e-4)
    effects = -(evaluator.circuit_values(keep) - full)
    attributed = torch.stack([scores[tuple(edges[i].tolist())] for i in picked.tolist()]).double()
    assert torch.allclose(attributed, effects, atol=1e-4)


def test_integrated_gradients_per_position_converge_to_per_position_patching():
    _, context = planted_context("induction_soft", n_pairs=8)
    scores = eap_ig.discover(context, EapIgSettings(steps=16, points="midpoint", positions="per_token")).scores
    view = PositionalEdgeSpace(PositionalGraph.from_data(context.graph, context.data))
    edges = view.mask.nonzero()
    order = scores[view.mask].abs().argsort(descending=True)[:6]
    keep = view.mask[None].repeat(len(order), 1, 1, 1, 1)
    for k, i in enumerate(order.tolist()):
        keep[(k, *edges[i].tolist())] = False
    evaluator = CircuitEvaluator(view, context.adapter, context.data, context.metric, context.ablation, 8)
    full, empty = evaluator.full_and_empty()
    effects = -(evaluator.circuit_values(keep) - full)
    attributed = torch.stack([scores[tuple(edges[i].tolist())] for i in order.tolist()]).double()
    assert torch.allclose(attributed, effects, atol=0.005 * (full - empty))


@pytest.fixture(scope="module")
def v_composition_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("positions_runs")
    planted = build("v_composition")
    export(replace(planted, pairs=planted.pairs[:8]), work / "model", work / "task")
    return work


@pytest.mark.parametrize("granularity, top_n", [("edge", 3), ("node", 3)])
def test_per_position_circuits_run_through_discovery_evaluation_and_graphviz(v_composition_dir, granularity, top_n):
    from circuitctl.config.load import load_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.runner import discover

    work = v_composition_dir
    config_path = work / f"{granularity}.yaml"
    config_path.write_text(
        f"model: {{path: model}}\ntask: {{path: task}}\n"
        f"method: {{name: eap_ig, positions: per_token, granularity: {granularity}, steps: 2}}\n"
        f"selection: {{top_n: {top_n}}}\noutput: {{dir: {work}/runs/{granularity}}}\n"
    )
    config = load_config(config_path, [])
    summary = discover(config, work)
    run = summary.run_dir
    assert summary.faithfulness == pytest.approx(1.0, abs=1e-4)
    record = json.loads((run / "circuit.json").read_text())
    assert record["space"]["kind"] == f"positional_{granularity}"
    assert record["space"]["positions"]["names"] == ["t0", "t1", "t2", "t3", "t4", "end"]
    if granularity == "edge":
        kept = {name for name, entry in record["edges"].items() if entry["in_graph"]}
        assert kept == {"input@t0->a0.h0@t1<v>", "a0.h0@t1->a1.h0@end<v>", "a1.h0@end->logits@end"}
    else:
        kept = {name for name, entry in record["nodes"].items() if entry["in_graph"]}
        assert kept == {"input@t0", "a0.h0@t1", "a1.h0@end"}
    dot = (run / "circuit.dot").read_text()
    assert '"a1.h0@end" [label="a1.h0\\n@end"' in dot and 'label="@t1"' in dot  # nodes carry their position names
    report, _ = evaluate_faithfulness(run, config, work, run, known=sorted(kept))
    assert report.faithfulness == pytest.approx(1.0, abs=1e-4) and report.completeness == pytest.approx(0.0, abs=1e-4)
    assert report.known_circuit["precision"] == 1.0 and report.known_circuit["roc_auc"] == 1.0
