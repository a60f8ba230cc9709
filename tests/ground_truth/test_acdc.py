"""ACDC: the fast implementation against a plain sequential one, planted circuits, sweeps,
checkpoints and resume.

`sequential_acdc` below is the reference: one candidate edge at a time, each test a full
`PatchingEngine.metric_values` call on the circuit with every removal so far plus that edge,
in the reference implementation's visiting order (derived here from the node names, not
from `circuitctl.methods.acdc`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from testkit import random_model, random_tokens
from helpers import planted_context

from circuitctl.checkpoint import Checkpoint
from circuitctl.config.methods import AcdcSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import InterruptedRun, UsageError
from circuitctl.graph import naming
from circuitctl.graph.pruning import prune
from circuitctl.methods import acdc
from circuitctl.methods.base import DiscoveryContext
from circuitctl.metrics.metrics import METRICS
from circuitctl.models.adapter import ModelAdapter
from circuitctl.methods.acdc.nodes import NodeComputer
from circuitctl.methods.acdc.incremental import ANSWER, EVERY, IncrementalSearch, LayerwiseSearch
from circuitctl.tasks.data import TaskData


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)


# ------------------------------------------------------------------------------------------
# The plain sequential reference
# ------------------------------------------------------------------------------------------
def reference_order(graph) -> list[str]:
    """logits, then per layer from the last: the MLP, the heads' v, k, q inputs (heads from the last)."""
    L, H = graph.spec.n_layers, graph.spec.n_heads
    names = [naming.LOGITS]
    for layer in reversed(range(L)):
        if graph.spec.has_mlps:
            names.append(naming.mlp(layer))
        for channel in "vkq":
            names += [naming.head_input(layer, h, channel) for h in reversed(range(H))]
    return names


def reference_senders(graph, down: str) -> list[str]:
    """Senders from the latest layer back: per layer the MLP, then heads 0, 1, ...; input last."""
    v = graph.downstream_index[down]
    readable = set(graph.upstream[: graph.prefix_len[v]])
    L, H = graph.spec.n_layers, graph.spec.n_heads
    names = []
    for layer in reversed(range(L)):
        names += [naming.mlp(layer)] if graph.spec.has_mlps else []
        names += [naming.head(layer, h) for h in range(H)]
    return [n for n in names + [naming.INPUT] if n in readable]


def sequential_acdc(engine, tau: float, sign: float, absolute: bool = False, value_of=None):
    """Plain ACDC: (membership after tree-shaking, {edge: change} of every tested edge).

    value_of(removed [U, V]) -> the dataset-mean metric with those edges removed; by default
    one `engine.metric_values` call (the benchmark also passes a full TransformerLens forward)."""
    graph = engine.graph
    if value_of is None:
        value_of = lambda removed: float(engine.metric_values(removed[None])[0])  # noqa: E731
    removed = torch.zeros_like(graph.edge_mask)
    current = value_of(removed)
    changes = {}
    for down in reference_order(graph):
        v = graph.downstream_index[down]
        senders = reference_senders(graph, down)
        if down != naming.LOGITS:
            node = graph.upstream_index[naming.parse_node(down).base]
            if not bool((graph.edge_mask[node] & ~removed[node]).any()):  # read by nothing: drop untested
                removed[: graph.prefix_len[v], v] = True
                continue
        for up in senders:
            u = graph.upstream_index[up]
            trial = removed.clone()
            trial[u, v] = True
            value = value_of(trial)
            change = sign * (value - current)
            changes[naming.edge(up, down)] = change
            if (abs(change) if absolute else change) < tau:
                removed, current = trial, value
    return prune(graph.edge_mask & ~removed, graph), changes


def fast_acdc(context, tau, **settings):
    result = acdc.discover(context, AcdcSettings(tau=tau, batch_size=settings.pop("batch_size", 8), **settings))
    return result


def assert_same_as_sequential(context, tau, absolute=False, **settings):
    engine = context.engine(8, keep_cache=True)
    expected, changes = sequential_acdc(engine, tau, context.metric.importance_sign, absolute)
    result = fast_acdc(context, tau, absolute=absolute, **settings)
    graph = context.graph
    assert graph.mask_to_edges(result.membership) == graph.mask_to_edges(expected), (tau, settings)
    scale = max(abs(c) for c in changes.values())
    untested = graph.edge_mask.clone()
    for edge, change in changes.items():  # the same edges were tested, with the same measured change
        u, v = graph.edge_index(edge)
        assert float(result.scores[u, v]) == pytest.approx(change, abs=1e-4 * scale), edge
        untested[u, v] = False
    assert not result.scores[untested].any()
    return changes, result


def close_tau(changes: dict[str, float]) -> float:
    """A tau 0.1% above a measured change (the median positive one): that edge's decision is close
    (though not within rounding), and so are the decisions of edges like it."""
    values = sorted(c for c in changes.values() if c > 0)
    return values[len(values) // 2] * 1.001


def random_context(seed=0, metric="kl", ablation="resample", n=12, length=7, **model):
    m = random_model(seed, **model)
    adapter = ModelAdapter(m)
    vocab = m.cfg.d_vocab
    lengths = torch.randint(length - 2, length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    data = TaskData(
        random_tokens(n, length, vocab, seed),
        random_tokens(n, length, vocab, seed + 1),
        lengths,
        random_tokens(n, 1, vocab, seed + 2),
        random_tokens(n, 1, vocab, seed + 3),
        {},
    )
    return DiscoveryContext(adapter, data, METRICS.get(metric), AblationConfig(type=ablation))


# ------------------------------------------------------------------------------------------
# Fast == sequential
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["copy_first", "v_composition", "induction_soft", "layernorm_mlp"])
def test_fast_equals_sequential_on_planted_models(name):
    pc, context = planted_context(name)
    full, empty = context.engine(8, keep_cache=True).full_and_empty()
    gap = abs(full - empty)
    changes, _ = assert_same_as_sequential(context, 0.01 * gap)
    assert_same_as_sequential(context, 0.1 * gap, candidates_per_pass=3)
    assert_same_as_sequential(context, 0.1 * gap, candidates_per_pass=16, trials_per_evaluation=16)
    assert_same_as_sequential(context, close_tau(changes), trials_per_evaluation=1)
    assert_same_as_sequential(context, 0.01 * gap, evaluator="layerwise", candidates_per_pass=5)


@pytest.mark.parametrize(
    "metric, ablation, model",
    [
        ("kl", "resample", {}),
        ("logit_diff", "zero", {}),
        ("kl", "mean", {"attn_only": True, "normalization_type": None, "n_layers": 3}),
        ("prob_diff", "resample", {"normalization_type": "RMS"}),
    ],
    ids=["kl-resample", "logitdiff-zero", "attnonly-mean", "probdiff-rms"],
)
def test_fast_equals_sequential_on_a_random_model(metric, ablation, model, monkeypatch):
    from circuitctl.models import unembedding

    monkeypatch.setattr(unembedding, "CPU_CHUNK", 5)  # the metric from vocabulary blocks (13 ids: 5, 5, 3)
    context = random_context(0, metric, ablation, **model)
    engine = context.engine(8, keep_cache=True)
    _, changes = sequential_acdc(engine, 1e-9, context.metric.importance_sign)  # every edge tested once
    positive = sorted(c for c in changes.values() if c > 0)
    for tau in (positive[len(positive) // 4], positive[len(positive) // 2]):
        measured, _ = assert_same_as_sequential(context, tau)
        assert_same_as_sequential(context, close_tau(measured), candidates_per_pass=4)
        assert_same_as_sequential(context, tau, candidates_per_pass=12, trials_per_evaluation=5)
    assert_same_as_sequential(context, positive[len(positive) // 2], absolute=True)


# ------------------------------------------------------------------------------------------
# Ground truth
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["copy_first", "v_composition", "induction_soft", "layernorm_mlp", "induction", "mlp_neurons"])
def test_acdc_recovers_planted_circuits(name):
    """logit difference, resample ablation, tau = 10% of the clean-corrupt logit-diff gap."""
    pc, context = planted_context(name)
    full, empty = context.engine(8, keep_cache=True).full_and_empty()
    result = fast_acdc(context, 0.1 * abs(full - empty))
    found = set(context.graph.mask_to_edges(result.membership))
    assert found == set(pc.true_edges), (sorted(found), sorted(pc.true_edges))


# ------------------------------------------------------------------------------------------
# The incremental evaluator
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model",
    [
        {},
        {"attn_only": True, "normalization_type": None, "n_layers": 3},
        {"parallel_attn_mlp": True},
        {"normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_dim": 4, "act_fn": "silu", "gated_mlp": True},
    ],
    ids=["ln-mlp", "attn-only", "parallel", "rms-rotary-gated"],
)
def test_incremental_trials_match_full_patched_runs(model):
    """Any circuit (not only ACDC's): trials and commits agree with the patching engine."""
    context = random_context(3, "logit_diff", **model)
    graph = context.graph
    engine = context.engine(5, keep_cache=True)
    gen = torch.Generator().manual_seed(5)
    removed = (torch.rand(graph.n_upstream, graph.n_downstream, generator=gen) < 0.4) & graph.edge_mask
    fast = IncrementalSearch(engine, NodeComputer(context.adapter), removed)
    slow = LayerwiseSearch(engine, removed)
    assert fast.current_value() == pytest.approx(slow.current_value(), rel=1e-4, abs=1e-5)
    for v in range(0, graph.n_downstream, 2):
        senders = [u for u in range(graph.prefix_len[v]) if not removed[u, v]][:4]
        if not senders:
            continue
        ablate = torch.rand(3, len(senders), generator=gen) < 0.5
        ablate[0] = torch.arange(len(senders)) == 0
        expected = slow.trial_values(v, senders, ablate)
        assert torch.allclose(fast.trial_values(v, senders, ablate), expected, rtol=1e-4, atol=1e-5), graph.downstream[v]
        fast.commit(v, senders[:2])
        slow.commit(v, senders[:2])
        assert fast.current_value() == pytest.approx(slow.current_value(), rel=1e-4, abs=1e-5)


def test_node_computer_reproduces_the_clean_run():
    context = random_context(1, "kl")
    adapter, graph = context.adapter, context.graph
    batch = context.data
    cap = adapter.run(batch.clean, batch.answer_positions)
    nodes = NodeComputer(adapter)
    ans = batch.answer_positions
    rows = torch.arange(batch.n)
    for layer in range(graph.spec.n_layers):
        resid = cap.resid[layer]
        for h in range(graph.spec.n_heads):
            q, k, v = (nodes.project(layer, h, c, resid) for c in "qkv")
            every = nodes.head_output(layer, h, nodes.attend(layer, q, k, v, None))
            assert torch.allclose(every, cap.outputs[graph.head_out_start[layer] + h], atol=1e-5)
            q_ans = nodes.project(layer, h, "q", resid[rows, ans][:, None])
            at_answer = nodes.head_output(layer, h, nodes.attend(layer, q_ans, k, v, ans))
            assert torch.allclose(at_answer[:, 0], every[rows, ans], atol=1e-5)
        mlp_in = cap.resid[layer + 1] - cap.outputs[graph.mlp_out_index[layer]]
        assert torch.allclose(nodes.mlp(layer, mlp_in), cap.outputs[graph.mlp_out_index[layer]], atol=1e-5)
    assert torch.allclose(nodes.logits(cap.resid[-1][rows, ans]), cap.logits, atol=1e-4)
    assert (ANSWER, EVERY) == (1, 2)


# ------------------------------------------------------------------------------------------
# Settings, sweeps, checkpoints, resume
# ------------------------------------------------------------------------------------------
def test_settings_are_validated():
    with pytest.raises(ValueError, match="tau must be > 0"):
        AcdcSettings(tau=0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        AcdcSettings(tau=[0.1, -1])
    with pytest.raises(ValueError, match="at least one"):
        AcdcSettings(tau=[])
    assert AcdcSettings(tau=[0.1, 0.2]).tau == [0.1, 0.2]


def test_checkpoint_round_trip_and_refusal(tmp_path):
    checkpoint = Checkpoint(tmp_path, "abc")
    assert checkpoint.load("acdc") is None
    checkpoint.save("acdc", {"x": 1.5}, {"t": torch.arange(3)})
    checkpoint.save("acdc", {"x": 2.5}, {"t": torch.arange(4)})
    state, tensors = checkpoint.load("acdc")
    assert state == {"x": 2.5} and tensors["t"].tolist() == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="different config"):
        Checkpoint(tmp_path, "other").load("acdc")
    with pytest.raises(UsageError, match="method 'acdc'"):
        checkpoint.load("exact")
    checkpoint.clear()
    assert not checkpoint.dir.exists()


def _world(tmp_path, model_dir: Path, task_path: Path, metric: str):
    def write_config(name: str, tau, **method) -> Path:
        config = {
            "model": {"path": str(model_dir), "device": "cpu"},
            "task": {"path": str(task_path)},
            "method": {"name": "acdc", "tau": tau, "batch_size": 8, **method},
            "metric": metric,
            "output": {"dir": str(tmp_path / name)},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return tmp_path, write_config


@pytest.fixture
def planted_world(tmp_path):
    """v_composition exported to disk, and a config writer."""
    from circuitctl.testing.planted import build, export

    model_dir, task_dir = export(build("v_composition"), tmp_path / "model", tmp_path / "task")
    return _world(tmp_path, model_dir, task_dir / "task.yaml", "logit_diff")


@pytest.fixture
def random_world(tmp_path):
    """A random 2-layer model on disk (every removal changes the metric a little), KL metric."""
    from safetensors.torch import save_file

    fields = dict(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=3, d_vocab=13, act_fn="gelu", normalization_type="LN", d_mlp=32)
    model = random_model(2, **fields)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(fields))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model" / "model.safetensors"))
    clean, corrupt = random_tokens(10, 8, 13, 1).tolist(), random_tokens(10, 8, 13, 2).tolist()
    with open(tmp_path / "pairs.jsonl", "w") as handle:
        for c, k in zip(clean, corrupt):
            wrong = k[0] if k[0] != c[0] else (c[0] + 1) % 13  # an answer may not also be a wrong answer
            handle.write(json.dumps({"clean": c, "corrupt": k, "answers": [c[0]], "wrong_answers": [wrong]}) + "\n")
    return _world(tmp_path, tmp_path / "model", tmp_path / "pairs.jsonl", "kl")


def _run(path: Path, **kwargs):
    from circuitctl.config.load import load_config
    from circuitctl.runner import discover

    return discover(load_config(path, []), path.parent, **kwargs)


def _circuit(path: Path) -> dict:
    record = json.loads(path.read_text())
    return {"edges": record["edges"], "results": {k: v for k, v in record["results"].items() if k != "forward_passes"}}


def test_a_tau_list_writes_one_circuit_per_value(planted_world):
    root, write_config = planted_world
    summary = _run(write_config("sweep", [0.5, 2.0]))
    assert [row["label"] for row in summary.sweep] == ["tau-0.5", "tau-2"]
    table = json.loads((root / "sweep" / "sweep.json").read_text())
    assert [p["tau"] for p in table["points"]] == [0.5, 2.0]
    for row in summary.sweep:
        single = _run(write_config(f"single-{row['tau']}", row["tau"]))
        assert row["n_in_circuit"] == single.n_in_circuit
        assert row["faithfulness"] == pytest.approx(single.faithfulness)
        swept = json.loads((root / "sweep" / row["label"] / "circuit.json").read_text())
        alone = json.loads((root / f"single-{row['tau']}" / "circuit.json").read_text())
        assert swept["edges"] == alone["edges"]
        assert (root / "sweep" / row["label"] / "circuit.mib.json").exists()
    assert not (root / "sweep" / "checkpoint").exists()  # finished runs keep no checkpoint


@pytest.mark.parametrize("evaluator", ["incremental", "layerwise"])
def test_interrupted_run_resumes_to_the_same_result(random_world, monkeypatch, evaluator):
    """Ctrl-C in the middle of a batch, in the first and in the second tau of a sweep: the resumed
    run ends with the circuits and scores of an uninterrupted one, bit for bit."""
    root, write_config = random_world
    taus = [0.002, 0.02]
    _run(write_config("reference", taus, evaluator=evaluator, candidates_per_pass=4, trials_per_evaluation=4))
    search_class = IncrementalSearch if evaluator == "incremental" else LayerwiseSearch
    original = search_class.trial_values
    calls = {"n": 0, "stop": None}

    def trial_values(self, *args):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a batch
        return original(self, *args)

    monkeypatch.setattr(search_class, "trial_values", trial_values)
    total = calls["n"] = 0
    _run(write_config("counting", taus, evaluator=evaluator, candidates_per_pass=4, trials_per_evaluation=4))
    total = calls["n"]
    for name, stops in (("once", [total // 3]), ("twice", [total // 4, 3 * total // 4])):
        config = write_config(name, taus, evaluator=evaluator, candidates_per_pass=4, trials_per_evaluation=4, checkpoint_every_seconds=3600)
        run_dir = root / name
        for i, stop in enumerate(stops):
            calls["n"], calls["stop"] = 0, stop - (stops[i - 1] if i else 0)
            with pytest.raises(InterruptedRun, match="--resume"):
                _run(config, resume=run_dir if i else None)
            assert not (run_dir / "sweep.json").exists()  # unfinished: nothing written but the checkpoint
        calls["n"], calls["stop"] = 0, None
        _run(config, resume=run_dir)
        # every batch's evaluation is one call (4 candidates, 4 trials per call): the resumed
        # run makes only the calls the interrupted runs did not finish
        assert calls["n"] == total - (stops[-1] - len(stops))
        for label in ("tau-0.002", "tau-0.02"):
            assert _circuit(run_dir / label / "circuit.json") == _circuit(root / "reference" / label / "circuit.json")
        assert not (run_dir / "checkpoint").exists()


def test_resume_refuses_another_config_and_finished_runs(planted_world, monkeypatch):
    root, write_config = planted_world
    config = write_config("run", [0.5, 2.0], checkpoint_every_seconds=3600)
    monkeypatch.setattr(IncrementalSearch, "trial_values", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(InterruptedRun, match="--resume"):
        _run(config)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="different config"):
        _run(write_config("other", [0.5, 3.0]), resume=root / "run")
    _run(config, resume=root / "run")
    with pytest.raises(UsageError, match="no checkpoint"):
        _run(config, resume=root / "run")


def test_checkpoints_are_written_while_running(planted_world, monkeypatch):
    root, write_config = planted_world
    saved = []
    original = Checkpoint.save
    monkeypatch.setattr(Checkpoint, "save", lambda self, *a: (saved.append(a[1]), original(self, *a)))
    _run(write_config("periodic", 0.5, checkpoint_every_seconds=0))
    assert len(saved) > 3
    positions = [s["active"]["position"] for s in saved if s["active"]]
    assert positions == sorted(positions) and positions[-1] > positions[0]


def test_a_relative_tau_is_a_fraction_of_the_clean_ablated_gap():
    from circuitctl.methods.acdc import metric_gap

    _, context = planted_context("layernorm_mlp")
    gap = metric_gap(context.engine(8, keep_cache=True))
    assert gap > 1.0
    relative = acdc.discover(context, AcdcSettings(tau=0.1, tau_mode="relative", batch_size=8))
    absolute = acdc.discover(context, AcdcSettings(tau=0.1 * gap, batch_size=8))
    assert torch.equal(relative.membership, absolute.membership) and torch.equal(relative.scores, absolute.scores)
    assert relative.extra["tau_abs"] == pytest.approx(0.1 * gap)


def test_a_method_keeps_its_own_circuit_unless_asked_to_reselect(tmp_path):
    """The demo config has selection.top_n: 40; switched to ACDC it must give ACDC's circuit (issue 14)."""
    from circuitctl.config.load import load_config
    from circuitctl.runner import discover
    from circuitctl.resources import SHIPPED_CONFIGS

    config = SHIPPED_CONFIGS / "planted-layernorm-mlp-eap.yaml"  # selection: top_n: 10
    own = discover(load_config(config, ["method.name=acdc", f"output.dir={tmp_path / 'own'}"]), config.parent)
    assert own.chosen_by == "acdc's own circuit" and own.n_in_circuit != 10
    assert any("selection.top_n: 10 was not applied" in note for note in own.notes)
    again = discover(load_config(config, ["method.name=acdc", "selection.reselect=true", f"output.dir={tmp_path / 're'}"]), config.parent)
    assert again.chosen_by.startswith("the top 10 edges by |score|") and again.n_in_circuit <= 10
    record = json.loads((tmp_path / "own" / "circuit.json").read_text())
    assert record["results"]["chosen_by"] == "acdc's own circuit"
