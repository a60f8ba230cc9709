"""Automatic path patching: planted circuits, the distributed-mechanism failure and its
mitigations, and the batched implementation against a plain one-path-at-a-time one.

The plain implementation below shares no code with `circuitctl/methods/path_patching/patcher.py`: it
patches one path at a time and recomputes every changed circuit node with its own
TransformerLens forward pass, through TL's split-qkv / attn-result / mlp-in hooks.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from testkit import DEVICE, random_model, random_tokens

from circuitctl.config.methods import PathPatchingSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.graph import naming
from circuitctl.methods import path_patching as pp
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.methods.path_patching.patcher import NodePatch, PathEdge
from circuitctl.testing.planted import build, build_model, export
from circuitctl.tasks.data import TaskData, tokenize_pairs
from circuitctl.tasks.records import pair_from_record

LOGIT_DIFF = METRICS.get("logit_diff")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


# ----------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------
def _induction_labels(record: dict) -> dict:
    """First occurrence of the final token (A1), the token after it (B1), the end."""
    clean = record["clean"]
    a1 = clean.index(clean[-1])
    return {**record, "positions": {"A1": a1, "B1": a1 + 1, "end": len(clean) - 1}}


def planted_context(name: str, labelled: bool = False):
    pc = build(name)
    model = build_model(pc).to(DEVICE)
    adapter = ModelAdapter(model)
    records = [_induction_labels(r) if labelled else r for r in pc.pairs]
    data = tokenize_pairs([pair_from_record(r, "t") for r in records], None, adapter.d_vocab, None, "t")
    return pc, model, DiscoveryContext(adapter, data, LOGIT_DIFF, AblationConfig())


def random_context(seed: int, **overrides):
    model = random_model(seed, **overrides)
    adapter = ModelAdapter(model)
    n, length, vocab = 8, 5, model.cfg.d_vocab
    answers = random_tokens(n, 1, vocab, seed + 1)
    data = TaskData(
        clean=random_tokens(n, length, vocab, seed + 2),
        corrupt=random_tokens(n, length, vocab, seed + 3),
        lengths=torch.full((n,), length),
        answers=answers,
        wrong=(answers + 1) % vocab,
        positions={},
    )
    return model, DiscoveryContext(adapter, data, LOGIT_DIFF, AblationConfig())


def positional_graph(context):
    from circuitctl.graph.positional import PositionalGraph

    return PositionalGraph.from_data(context.graph, context.data, "method 'path_patching'")


def run_search(context, settings, evaluator=None):
    """The search with the batched evaluator (or a given one); returns the positional circuit."""
    slots = positional_graph(context).layout
    batched, clean_value, changed = pp.batched_evaluator(context, slots, settings.batch_size, settings.senders_per_pass)
    return pp.grow_circuit(
        context.graph, slots, slots.index(context.data), settings, evaluator or batched, clean_value, LOGIT_DIFF.importance_sign, changed
    )


def kept_names(context, found) -> set[str]:
    pgraph = positional_graph(context)
    return {pgraph.edge_name(p.sender_slot, p.receiver_slot, p.sender, p.receiver_input) for p in found.kept}


def projected_edges(context, found) -> set[str]:
    from circuitctl.circuits.positional import project

    pgraph = positional_graph(context)
    _, membership = project(pgraph, *pp.positional_scores(pgraph, found))
    return set(context.graph.mask_to_edges(membership))


# ----------------------------------------------------------------------------------------
# The plain implementation (test oracle)
# ----------------------------------------------------------------------------------------
def _order(name: str) -> tuple:
    node = naming.parse_node(name)
    return {"input": (-1, 0), "logits": (math.inf, 0)}.get(node.kind, (node.layer, 1 if node.kind == "mlp" else 0))


class PlainPathPatching:
    """Path patching one path at a time with TransformerLens's own hooks."""

    def __init__(self, model, context: DiscoveryContext):
        self.model = copy.deepcopy(model)
        self.model.set_use_split_qkv_input(True)
        self.model.set_use_attn_result(True)
        if not self.model.cfg.attn_only:
            self.model.set_use_hook_mlp_in(True)
        self.graph = context.graph
        self.data = context.data
        self.slots = positional_graph(context).layout
        self.index = self.slots.index(context.data)
        self.rows = torch.arange(context.data.n)
        with torch.no_grad():
            self.clean_logits_full = self.model(self.data.clean)
        self.clean_out = self._outputs(self.data.clean)
        self.corrupt_out = self._outputs(self.data.corrupt)

    @torch.no_grad()
    def _outputs(self, tokens) -> dict[str, torch.Tensor]:
        _, cache = self.model.run_with_cache(tokens)
        out = {naming.INPUT: cache["blocks.0.hook_resid_pre"]}
        for layer in range(self.model.cfg.n_layers):
            for h in range(self.model.cfg.n_heads):
                out[naming.head(layer, h)] = cache[f"blocks.{layer}.attn.hook_result"][:, :, h]
            if not self.model.cfg.attn_only:
                out[naming.mlp(layer)] = cache[f"blocks.{layer}.hook_mlp_out"]
        return out

    def _at(self, outputs, name, slot):
        return outputs[name][self.rows, self.index[slot]]

    def _diff(self, name, slot):
        if name == naming.LOGITS:
            return sum(self._at(self.corrupt_out, u, slot) - self._at(self.clean_out, u, slot) for u in self.clean_out)
        return self._at(self.corrupt_out, name, slot) - self._at(self.clean_out, name, slot)

    @torch.no_grad()
    def _rerun(self, name: str, slot: int, inputs: list[tuple[str | None, int, torch.Tensor]]) -> torch.Tensor:
        """Change of `name`'s output at `slot` when its inputs change by (channel, key slot, delta)."""
        node = naming.parse_node(name)
        pos = self.index[slot]
        hooks, seen = [], {}

        def add_to(hook_name, head_index, items):
            def fn(x, hook):
                x = x.clone()
                for _, s, delta in items:
                    if head_index is None:
                        x[self.rows, self.index[s]] += delta
                    else:
                        x[self.rows, self.index[s], head_index] += delta
                return x

            hooks.append((hook_name, fn))

        def keep(x, hook):
            seen["out"] = x

        if node.kind == "head":
            for channel in "qkv":
                items = [i for i in inputs if i[0] == channel]
                if items:
                    add_to(f"blocks.{node.layer}.hook_{channel}_input", node.index, items)
            hooks.append((f"blocks.{node.layer}.attn.hook_result", keep))
            self.model.run_with_hooks(self.data.clean, fwd_hooks=hooks)
            return seen["out"][self.rows, pos, node.index] - self._at(self.clean_out, name, slot)
        if node.kind == "mlp":
            add_to(f"blocks.{node.layer}.hook_mlp_in", None, inputs)
            hooks.append((f"blocks.{node.layer}.hook_mlp_out", keep))
            self.model.run_with_hooks(self.data.clean, fwd_hooks=hooks)
            return seen["out"][self.rows, pos] - self._at(self.clean_out, name, slot)
        add_to(f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post", None, inputs)
        logits = self.model.run_with_hooks(self.data.clean, fwd_hooks=hooks)
        return logits[self.rows, pos]

    def value(self, circuit, source) -> float:
        g = self.graph

        def receiver_of(edge):
            return (naming.parse_node(g.downstream[edge.receiver_input]).base, edge.receiver_slot)

        if isinstance(source, NodePatch):
            start = (naming.LOGITS if source.node == g.n_upstream else g.upstream[source.node], source.slot)
        else:
            start = receiver_of(source)
        changed = {start}
        grew = True
        while grew:
            grew = False
            for edge in circuit:
                if (g.upstream[edge.sender], edge.sender_slot) in changed and receiver_of(edge) not in changed:
                    changed.add(receiver_of(edge))
                    grew = True
        deltas: dict[tuple[str, int], torch.Tensor] = {}
        logits = self.clean_logits_full[self.rows, self.data.answer_positions]
        for name, slot in sorted(changed, key=lambda item: _order(item[0])):
            if isinstance(source, NodePatch) and (name, slot) == start:
                delta = self._diff(name, slot)
                if name != naming.LOGITS:
                    deltas[(name, slot)] = delta
                    continue
                inputs = [(None, slot, delta)]
            else:
                inputs = []
                if isinstance(source, PathEdge) and (name, slot) == start:
                    channel = naming.parse_node(g.downstream[source.receiver_input]).channel
                    inputs.append((channel, source.sender_slot, self._diff(g.upstream[source.sender], source.sender_slot)))
                for edge in circuit:
                    sender = (g.upstream[edge.sender], edge.sender_slot)
                    if receiver_of(edge) == (name, slot) and sender in deltas:
                        inputs.append((naming.parse_node(g.downstream[edge.receiver_input]).channel, edge.sender_slot, deltas[sender]))
            if name == naming.LOGITS:
                logits = self._rerun(name, slot, inputs)
            else:
                deltas[(name, slot)] = self._rerun(name, slot, inputs)
        return float(LOGIT_DIFF(logits, self.data).double().mean())

    def evaluator(self):
        def evaluate(circuit, sources, description=""):
            return torch.tensor([self.value(list(circuit), s) for s in sources], dtype=torch.float64)

        return evaluate


# ----------------------------------------------------------------------------------------
# Planted circuits
# ----------------------------------------------------------------------------------------
EXPECTED = {
    "copy_first": {"a0.h0@end->logits@end", "input@t0->a0.h0@end<v>"},
    "v_composition": {"a1.h0@end->logits@end", "a0.h0@t1->a1.h0@end<v>", "input@t0->a0.h0@t1<v>"},
    "mlp_neurons": {"m0@end->logits@end", "a0.h0@end->m0@end", "input@t0->a0.h0@end<v>"},
    "layernorm_mlp": {"a1.h0@end->logits@end", "m0@t1->a1.h0@end<v>", "a0.h0@t1->m0@t1", "input@t0->a0.h0@t1<v>"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recovers_planted_circuits_with_channels_and_positions(name):
    pc, _, context = planted_context(name)
    found = run_search(context, PathPatchingSettings(threshold=0.1))
    assert kept_names(context, found) == EXPECTED[name]
    assert projected_edges(context, found) == set(pc.true_edges)
    for path in found.kept:  # every kept path carries the whole clean-corrupt gap
        assert found.scores[path] == pytest.approx(found.total_effect, rel=1e-4)


def test_k_composition_through_an_earlier_key_position():
    """Induction: the previous-token head's effect travels through the induction head's KEY
    at the position after the first occurrence (B1), not at the query position (end)."""
    pc, _, context = planted_context("induction_soft", labelled=True)
    found = run_search(context, PathPatchingSettings(threshold=0.1))
    assert found.slots.names == ("A1", "B1", "end", "other") and found.slots.n_single == 3  # other: never a sender
    assert kept_names(context, found) == {"a1.h0@end->logits@end", "a0.h0@B1->a1.h0@end<k>", "input@A1->a0.h0@B1<v>"}
    assert projected_edges(context, found) == set(pc.true_edges)
    key_path = next(p for p in found.kept if context.graph.downstream[p.receiver_input] == "a1.h0<k>")
    assert (found.slots.index(context.data)[key_path.sender_slot] < context.data.answer_positions).all()
    # with everything frozen but this one key path, it carries (nearly) the full effect
    assert found.scores[key_path] == pytest.approx(found.total_effect, rel=1e-3)


def test_unlabelled_positions_are_named_by_token_index():
    """Without labels the k-composition lands at whichever index holds B1 in each example:
    one kept key path per index, each fed by the previous-token head reading the index before."""
    pc, _, context = planted_context("induction_soft")
    found = run_search(context, PathPatchingSettings(threshold=0.05))
    names = kept_names(context, found)
    key_paths = sorted(n for n in names if "<k>" in n)
    b1 = {int(r["clean"].index(r["clean"][-1])) + 1 for r in pc.pairs}
    assert key_paths == sorted(f"a0.h0@t{i}->a1.h0@end<k>" for i in b1)
    assert names == {"a1.h0@end->logits@end"} | set(key_paths) | {f"input@t{i - 1}->a0.h0@t{i}<v>" for i in b1}
    # each example's key effect sits at one index, so the per-index effects add up to the total
    total_k = sum(found.scores[p] for p in found.kept if "<k>" in context.graph.downstream[p.receiver_input])
    assert total_k == pytest.approx(found.total_effect, rel=2e-2)
    assert projected_edges(context, found) == set(pc.true_edges)


# ----------------------------------------------------------------------------------------
# The distributed mechanism: the failure and its mitigations
# ----------------------------------------------------------------------------------------
def test_fixed_threshold_misses_a_distributed_mechanism():
    pc, _, context = planted_context("distributed")
    found = run_search(context, PathPatchingSettings(threshold=2.0, threshold_mode="absolute"))
    assert found.kept == []  # the whole mechanism is missed
    assert found.total_effect == pytest.approx(6.0, rel=1e-5)
    contributors = {p: s for p, s in found.scores.items() if context.graph.upstream[p.sender] in {f"a0.h{h}" for h in range(6)}}
    assert len(contributors) == 6 and all(s == pytest.approx(1.0, rel=1e-5) for s in contributors.values())


@pytest.mark.parametrize(
    "settings",
    [
        PathPatchingSettings(threshold=0.1, threshold_mode="relative"),
        PathPatchingSettings(threshold=2.0, threshold_mode="absolute", top_k=6),
    ],
    ids=["relative", "top_k"],
)
def test_mitigations_recover_the_distributed_mechanism(settings):
    pc, _, context = planted_context("distributed")
    found = run_search(context, settings)
    assert projected_edges(context, found) == set(pc.true_edges)
    assert len(found.kept) == 12  # distractors a0.h6/a0.h7 (larger outputs, no effect) stay out


# ----------------------------------------------------------------------------------------
# Batched == plain
# ----------------------------------------------------------------------------------------
def test_batched_search_equals_plain_search_on_planted_models():
    for name, labelled in (("induction_soft", True), ("layernorm_mlp", False)):
        pc, model, context = planted_context(name, labelled)
        settings = PathPatchingSettings(threshold=0.1, senders_per_pass=7, batch_size=10)
        batched = run_search(context, settings)
        plain = run_search(context, settings, PlainPathPatching(model, context).evaluator())
        assert batched.kept == plain.kept
        assert batched.scores.keys() == plain.scores.keys()
        for path, score in plain.scores.items():
            assert batched.scores[path] == pytest.approx(score, abs=1e-4), (name, path)


@pytest.mark.parametrize("name", ["induction_soft", "layernorm_mlp"])
def test_skipping_unchanged_senders_changes_nothing_but_the_cost(name):
    """Paths from outputs that are equal in the clean and ablated runs (here: the input at the
    uncorrupted positions) are scored 0 without a patch."""
    _, _, context = planted_context(name)
    settings = PathPatchingSettings(threshold=0.05)
    slots = positional_graph(context).layout
    evaluate, clean_value, changed = pp.batched_evaluator(context, slots, 16, 32)
    args = (context.graph, slots, slots.index(context.data), settings, evaluate, clean_value, -1.0)
    everything, skipping = pp.grow_circuit(*args), pp.grow_circuit(*args, changed)
    assert skipping.kept == everything.kept
    assert skipping.scores.keys() == everything.scores.keys()
    assert all(skipping.scores[p] == pytest.approx(s, abs=1e-5) for p, s in everything.scores.items())
    assert skipping.n_patches < 0.8 * everything.n_patches
    assert not changed[context.graph.upstream_index["input"], slots.answer]  # the last token is never corrupted


RANDOM_MODELS = {
    "ln_mlp": dict(),
    "attn_only": dict(attn_only=True, normalization_type=None),
    "rms_rotary_gated": dict(normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=4, act_fn="silu", gated_mlp=True),
    "parallel": dict(parallel_attn_mlp=True),
}


# A circuit with every kind of propagation: q, k and v paths at earlier key positions, one
# sender feeding two receivers, MLPs in the middle; the sources patch paths into circuit
# nodes (also at key positions the circuit already uses, and a circuit path itself), paths
# into the logits, and whole nodes.
RANDOM_CIRCUIT = [
    "a1.h0@end->logits@end", "a1.h1@end->logits@end", "m1@end->logits@end",
    "a0.h0@t1->a1.h0@end<k>", "a0.h1@end->a1.h0@end<q>", "m0@t2->a1.h0@end<v>", "a0.h2@t2->a1.h0@end<v>",
    "a0.h0@t1->a1.h1@end<k>", "a0.h2@t3->a1.h1@end<v>", "a0.h1@end->m1@end", "a0.h2@t2->m0@t2",
]
RANDOM_SOURCES = [
    "logits@end", "a1.h0@end", "a0.h0@t1", "m0@t2",
    "input@t1->a0.h0@t1<v>", "input@t0->a0.h0@t1<k>", "input@t1->a0.h0@t1<q>", "input@t2->a0.h2@t2<q>",
    "input@t2->m0@t2", "a0.h1@t3->a1.h0@end<k>", "a0.h0@t1->a1.h0@end<k>", "input@end->logits@end",
    "a0.h2@end->a1.h1@end<q>", "input@t0->a0.h2@t3<v>", "m0@t1->a1.h1@end<v>", "a0.h1@end->m1@end",
]


def _parse(graph, slots, name: str):
    if "->" not in name:
        node, slot = name.rsplit("@", 1)
        if node != naming.LOGITS and node not in graph.upstream_index:
            return None
        return NodePatch(graph.n_upstream if node == naming.LOGITS else graph.upstream_index[node], slots.names.index(slot))
    sender, receiver = (naming.parse_node(n) for n in naming.parse_edge(name))
    v = receiver.base + (f"<{receiver.channel}>" if receiver.channel else "")
    if sender.base not in graph.upstream_index or v not in graph.downstream_index:
        return None  # an MLP of an attention-only model
    u = graph.upstream_index[sender.base]
    return PathEdge(u, slots.names.index(sender.position), graph.downstream_index[v], slots.names.index(receiver.position))


@pytest.mark.parametrize("kind", sorted(RANDOM_MODELS))
def test_batched_path_patches_equal_plain_ones_on_random_models(kind):
    model, context = random_context(0, **RANDOM_MODELS[kind])
    graph, slots = context.graph, positional_graph(context).layout
    circuit = [e for e in (_parse(graph, slots, n) for n in RANDOM_CIRCUIT) if e is not None]
    sources = [e for e in (_parse(graph, slots, n) for n in RANDOM_SOURCES) if e is not None]
    batched, clean_value, _ = pp.batched_evaluator(context, slots, batch_size=3, senders_per_pass=5)
    values = batched(circuit, sources, "")
    plain = PlainPathPatching(model, context)
    expected = torch.tensor([plain.value(circuit, source) for source in sources], dtype=torch.float64)
    assert (expected - clean_value).abs().max() > 0.05  # the patches do change the metric
    assert torch.allclose(values, expected, atol=2e-4), (values - expected).abs().max()
    # a path into a node outside the circuit reaches the metric through no circuit edge
    outside = _parse(graph, slots, "input@t0->a0.h1@t2<v>")
    assert float(batched(circuit, [outside], "")[0]) == pytest.approx(clean_value, abs=1e-6)


# ----------------------------------------------------------------------------------------
# Output: the positional circuit file, its drawing, and a run through the CLI runner
# ----------------------------------------------------------------------------------------
def test_discover_writes_positional_circuit_and_drawing(tmp_path):
    from circuitctl.config.load import validate_config
    from circuitctl.runner import discover

    pc = build("induction_soft")
    model_dir, task_dir = export(pc, tmp_path / "model", tmp_path / "task")
    pairs = [json.loads(line) for line in (task_dir / "pairs.jsonl").read_text().splitlines()]
    (task_dir / "pairs.jsonl").write_text("".join(json.dumps(_induction_labels(r)) + "\n" for r in pairs))
    config = validate_config(
        {
            "model": {"path": str(model_dir), "device": "cpu"},
            "task": {"path": str(task_dir / "task.yaml")},
            "method": {"name": "path_patching", "threshold": 0.1},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    summary = discover(config)
    run = tmp_path / "run"
    record = json.loads((run / "circuit.json").read_text())
    assert record["space"]["kind"] == "positional_edge" and summary.chosen_by == "path_patching's own circuit"
    kept = {name for name, entry in record["edges"].items() if entry["in_graph"]}
    assert kept == {"a1.h0@end->logits@end", "a0.h0@B1->a1.h0@end<k>", "input@A1->a0.h0@B1<v>"}
    assert record["space"]["positions"]["names"][:3] == ["A1", "B1", "end"]
    mib = json.loads((run / "circuit.mib.json").read_text())  # the projection onto the edge graph
    assert {name for name, entry in mib["edges"].items() if entry["in_graph"]} == set(pc.true_edges)
    assert summary.faithfulness == pytest.approx(1.0, abs=0.02)
    dot = (run / "circuit.dot").read_text()
    assert dot.count("subgraph cluster_") == 3 and 'label="@B1"' in dot
    assert '"a0.h0@B1" -> "a1.h0@end" [color="#1a9641"' in dot  # k edges in the key colour


def test_settings_are_checked():
    from circuitctl.config.load import validate_config
    from circuitctl.errors import UsageError

    base = {"model": {"path": "m"}, "task": {"path": "t"}}
    for bad in ({"threshold_mode": "percent"}, {"top_k": 0}, {"node_types": ["heads", "neurons"]}, {"depth": 2}):
        with pytest.raises(UsageError):
            validate_config({**base, "method": {"name": "path_patching", **bad}})
    config = validate_config({**base, "method": {"name": "path_patching", "node_types": ["heads"], "max_depth": 2}})
    assert config.method.node_types == ("heads",) and config.method.max_depth == 2


def test_zero_ablation():
    _, _, context = planted_context("copy_first")
    context = DiscoveryContext(context.adapter, context.data, LOGIT_DIFF, AblationConfig(type="zero"))
    found = run_search(context, PathPatchingSettings(threshold=0.1))
    # zeroing the query or the key at position 0 also breaks the head's positional attention,
    # which resampling (same positions in both prompts) leaves intact
    assert kept_names(context, found) == EXPECTED["copy_first"] | {"input@end->a0.h0@end<q>", "input@t0->a0.h0@end<k>"}
    # zeroing a0.h0 (or its value) removes its +5 on the answer logit; the clean diff is +5
    assert found.total_effect == pytest.approx(5.0, rel=1e-5)
    pgraph = positional_graph(context)
    named = {pgraph.edge_name(p.sender_slot, p.receiver_slot, p.sender, p.receiver_input): s for p, s in found.scores.items()}
    assert named["a0.h0@end->logits@end"] == pytest.approx(5.0, rel=1e-5)
    assert named["input@t0->a0.h0@end<v>"] == pytest.approx(5.0, rel=1e-5)


def test_labels_sharing_a_token_are_refused():
    from circuitctl.errors import UsageError

    _, _, context = planted_context("induction_soft", labelled=True)
    data = context.data
    clash = TaskData(data.clean, data.corrupt, data.lengths, data.answers, data.wrong, {**data.positions, "A2": data.positions["B1"]})
    with pytest.raises(UsageError, match="same token"):
        positional_graph(DiscoveryContext(context.adapter, clash, LOGIT_DIFF, AblationConfig()))


def test_unequal_lengths_without_labels_are_refused():
    from circuitctl.errors import UsageError

    _, context = random_context(1)
    data = context.data
    ragged = TaskData(data.clean, data.corrupt, torch.tensor([5, 4, 5, 5, 5, 5, 5, 5]), data.answers, data.wrong, {})
    with pytest.raises(UsageError, match="position"):
        positional_graph(DiscoveryContext(context.adapter, ragged, LOGIT_DIFF, AblationConfig()))
