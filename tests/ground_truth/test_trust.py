"""Trust in a circuit, against ground truth:

* per-example metric values of the one evaluator equal evaluating each example on its own;
* EAP and EAP-IG per-example score contributions equal running the method on each example, and
  the bootstrap built from them gives the same circuits as rerunning the method on every resample;
* on planted models every true edge is in every resampled circuit and no distractor is;
* compare: a run against itself gives Jaccard 1 and Spearman 1; EAP against exact patching on
  planted models where EAP is exact (linear in the patched path) gives Spearman 1.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import planted_context
from testkit import torchrun

from circuitctl.analysis.compare import compare
from circuitctl.analysis.stability import stability
from circuitctl.batching import collect_notes
from circuitctl.circuits.evaluator import CircuitEvaluator
from circuitctl.config.load import load_config
from circuitctl.config.methods import EapIgSettings, EapSettings
from circuitctl.methods import eap, eap_ig

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "v1"

pytestmark = pytest.mark.usefixtures("one_thread")


def space_of(kind: str, context):
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.neurons import NeuronSpace
    from circuitctl.circuits.nodes import NodeSpace
    from circuitctl.circuits.positional import PositionalEdgeSpace
    from circuitctl.graph.positional import PositionalGraph

    graph = context.graph
    if kind == "edge":
        return EdgeSpace(graph)
    if kind == "node":
        return NodeSpace(graph)
    if kind == "neuron":
        return NeuronSpace(graph, context.adapter.cfg.d_mlp)
    return PositionalEdgeSpace(PositionalGraph.from_data(graph, context.data))


def circuits(space, k: int = 3) -> torch.Tensor:
    keep = torch.rand(k, *space.mask.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    return keep & space.mask


@pytest.mark.parametrize("kind,name,ablation", [
    ("edge", "layernorm_mlp", "resample"), ("node", "layernorm_mlp", "zero"),
    ("neuron", "mlp_neurons", "resample"), ("positional_edge", "v_composition", "resample"),
])
def test_per_example_values_equal_evaluating_each_example_alone(kind, name, ablation):
    _, context = planted_context(name, ablation=ablation, n_pairs=7)
    space = space_of(kind, context)
    keep = circuits(space)
    evaluator = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 3)
    rows = torch.zeros(keep.shape[0], context.data.n, dtype=torch.float64)
    means = evaluator.circuit_values(keep, per_example=rows)
    plain = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 3).circuit_values(keep)
    assert torch.equal(means, plain)  # the dataset means are not changed by asking for the rows
    assert torch.allclose(rows.mean(1), means, atol=1e-9)
    full_empty = evaluator.full_and_empty_per_example()
    for i in range(context.data.n):
        alone = CircuitEvaluator(space, context.adapter, context.data.take(torch.tensor([i])), context.metric, context.ablation, 3)
        assert torch.allclose(rows[:, i], alone.circuit_values(keep), atol=1e-5), i
        assert torch.allclose(full_empty[:, i], torch.tensor(alone.full_and_empty(), dtype=torch.float64), atol=1e-5), i


def test_per_example_values_survive_out_of_memory_halving(monkeypatch):
    _, context = planted_context("layernorm_mlp", n_pairs=10)
    space = space_of("edge", context)
    keep = circuits(space)
    expected = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 8).per_example_values(keep)
    halving = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 8)
    original = halving.patcher.logits

    def failing(state, masks):
        if state.n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(state, masks)

    monkeypatch.setattr(halving.patcher, "logits", failing)
    with collect_notes() as notes:
        values = halving.per_example_values(keep)
    assert torch.allclose(values, expected, atol=1e-6)
    assert any("continuing with" in note for note in notes)


SETTINGS = {
    "eap": (eap, EapSettings(batch_size=3)),
    "eap_ig inputs": (eap_ig, EapIgSettings(batch_size=3, steps=3)),
    "eap_ig activations": (eap_ig, EapIgSettings(batch_size=3, steps=3, variant="activations")),
    "eap_ig node": (eap_ig, EapIgSettings(batch_size=3, steps=3, granularity="node")),
    "eap_ig neuron": (eap_ig, EapIgSettings(batch_size=3, steps=3, granularity="neuron")),
}


@pytest.mark.parametrize("which", SETTINGS)
def test_per_example_contributions_equal_the_method_on_each_example(which):
    module, settings = SETTINGS[which]
    _, context = planted_context("layernorm_mlp", n_pairs=7)
    normal = module.discover(context, settings)
    result = module.discover(replace(context, per_example=True), settings)
    assert result.per_example.shape == (context.data.n, *normal.scores.shape)
    assert torch.allclose(result.scores, normal.scores, atol=1e-5)
    assert torch.allclose(result.per_example.mean(0), normal.scores, atol=1e-5)
    for i in (0, 4):
        alone = module.discover(replace(context, data=context.data.take(torch.tensor([i]))), settings).scores
        assert torch.allclose(result.per_example[i], alone, atol=1e-5), i
    resample = torch.tensor([2, 2, 6, 0, 5, 5, 5])  # a bootstrap resample: repeats, some examples left out
    rerun = module.discover(replace(context, data=context.data.take(resample)), settings).scores
    assert torch.allclose(result.per_example[resample].mean(0), rerun, atol=1e-5)


def test_per_position_eap_ig_has_no_per_example_contributions():
    """Not implemented for per-position graphs: the method says so (None) and stability reruns."""
    _, context = planted_context("v_composition", n_pairs=4)
    result = eap_ig.discover(replace(context, per_example=True), EapIgSettings(batch_size=2, steps=2, positions="per_token"))
    assert result.per_example is None


# ----------------------------------------------------------------------------------------------
# stability
# ----------------------------------------------------------------------------------------------
def planted_config(name: str, method: str, *overrides: str):
    base = ROOT / "configs" / "planted-layernorm-mlp-eap.yaml"
    return load_config(base, [f"model.path=models/{name}", f"task.name={name}", f"method.name={method}", "model.device=cpu", *overrides])


def true_edges(name: str) -> set[str]:
    return set((ROOT / "tasks" / name / "true_edges.txt").read_text().split())


@pytest.mark.parametrize("name,method,overrides", [
    ("planted-layernorm-mlp", "eap", ["selection.top_n=4"]),  # per-example contributions
    ("planted-distributed", "eap", ["selection.top_n=12"]),
    ("planted-layernorm-mlp", "exact", ["selection.top_n=4"]),  # reruns
    ("planted-v-composition", "acdc", []),  # reruns, ACDC's own circuit
])
def test_every_true_edge_is_in_every_resampled_circuit(name, method, overrides, tmp_path):
    record = stability(planted_config(name, method, *overrides), ROOT / "configs", tmp_path, n_resamples=6).record
    truth = true_edges(name)
    assert record["how"].startswith("per-example" if method == "eap" else "reruns")
    assert {e: record["edges"][e]["frequency"] for e in truth} == {e: 1.0 for e in truth}
    assert max(u["frequency"] for e, u in record["edges"].items() if e not in truth) < 1.0
    assert set(record["core"]) == truth and record["contingent"] == []
    assert record["jaccard"] == {"mean": 1.0, "min": 1.0, "vs_full": {"mean": 1.0, "min": 1.0}}
    assert record["faithfulness"]["core"] == pytest.approx(record["faithfulness"]["full_circuit"]) and record["faithfulness"]["core"] > 0.95
    assert len(record["runs"]) == 6 and (tmp_path / "stability.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_edge_pruning_keeps_the_planted_or_gate_on_every_resample_and_seed(tmp_path):
    """A stochastic method: every resample runs with every seed, and the planted OR gate (two
    heads, each enough alone: single-edge scores are 0) is the circuit every time."""
    config = load_config(ROOT / "configs" / "planted-or-gate-edge-pruning.yaml",
                         ["model.device=cpu", "method.steps=300", "method.sparsity_warmup_steps=150"])
    record = stability(config, ROOT / "configs", tmp_path, n_resamples=2, n_seeds=2).record
    assert record["n_runs"] == 4 and {r["seed"] for r in record["runs"]} == {0, 1}
    truth = true_edges("planted-or-gate")
    assert set(record["core"]) == truth and all(record["edges"][e]["frequency"] == 1.0 for e in truth)
    assert max(u["frequency"] for e, u in record["edges"].items() if e not in truth) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eap", "eap_ig"])
def test_the_bootstrap_from_contributions_equals_rerunning_the_method(method, tmp_path):
    """On the toy IOI model, where resampled circuits do differ (Jaccard about 0.8): the same
    circuit on every resample, whether formed from per-example contributions or by a rerun."""
    config = load_config(ROOT / "configs" / "demo.yaml", [f"method.name={method}", "model.device=cpu"])
    fast = stability(config, ROOT / "configs", tmp_path / "fast", n_resamples=6).record
    slow = stability(config, ROOT / "configs", tmp_path / "rerun", n_resamples=6, rerun=True).record
    assert fast["how"].startswith("per-example") and slow["how"].startswith("reruns")
    assert fast["jaccard"]["min"] < 1.0  # the resamples change the circuit: the check is not vacuous
    for a, b in zip(fast["runs"], slow["runs"]):
        assert a["n_in_circuit"] == b["n_in_circuit"] and a["jaccard_vs_full"] == b["jaccard_vs_full"]
    assert fast["jaccard"] == slow["jaccard"] and fast["core"] == slow["core"]
    runs = fast["n_runs"]
    assert all(u["frequency"] == round(u["frequency"] * runs) / runs for u in fast["edges"].values())  # k of n runs, exactly
    assert set(fast["core"]) == {e for e, u in fast["edges"].items() if u["frequency"] >= 0.9}
    for edge, unit in fast["edges"].items():
        assert unit["frequency"] == slow["edges"][edge]["frequency"], edge
        assert unit["score_mean"] == pytest.approx(slow["edges"][edge]["score_mean"], abs=1e-5), edge


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------
def test_a_run_compared_with_itself_agrees_perfectly(tmp_path):
    run = tmp_path / "demo"
    shutil.copytree(GOLDEN / "demo", run)
    record = compare([run, run], tmp_path / "out").record
    (pair,) = record["pairs"]
    assert pair["jaccard"] == 1.0 and pair["node_jaccard"] == 1.0
    assert pair["spearman"] == pytest.approx(1.0) and pair["spearman_abs"] == pytest.approx(1.0)
    assert pair["n_only_a"] == pair["n_only_b"] == 0 and pair["n_shared"] == 39 and pair["n_scored"] == 110
    assert [r["label"] for r in record["runs"]] == ["demo", "demo (2)"]


@pytest.mark.parametrize("name", ["planted-copy-first", "planted-v-composition", "planted-distributed"])
def test_eap_and_exact_patching_rank_edges_alike_where_eap_is_exact(name, tmp_path):
    from circuitctl.runner import discover

    top_n = f"selection.top_n={len(true_edges(name))}"  # beyond the true edges every score is 0 (+ rounding)
    for method in ("eap", "exact"):
        discover(planted_config(name, method, top_n, f"output.dir={tmp_path / method}"))
    record = compare([tmp_path / "eap", tmp_path / "exact"], tmp_path / "out").record
    (pair,) = record["pairs"]
    assert pair["spearman"] == pytest.approx(1.0) and pair["spearman_abs"] == pytest.approx(1.0) and pair["jaccard"] == 1.0
    assert pair["n_scored"] == record["runs"][0]["n_total"]


# ----------------------------------------------------------------------------------------------
# torchrun: each rank fills its share of the per-example rows; every rank ends with all of them
# ----------------------------------------------------------------------------------------------
DRIVER = '''
import json, sys
from dataclasses import replace
from pathlib import Path
from circuitctl import distributed
distributed.init_from_env("cpu")
sys.path.insert(0, sys.argv[2])
from test_trust import per_example_everything

Path(sys.argv[1], f"rank{distributed.rank()}.json").write_text(json.dumps(per_example_everything()))
'''


def per_example_everything() -> dict:
    """Per-example values of two kinds of circuits and EAP / EAP-IG contributions, 9 examples."""
    out = {}
    for kind, name in (("edge", "layernorm_mlp"), ("neuron", "mlp_neurons")):
        _, context = planted_context(name, n_pairs=9)  # odd: shards of 4 and 5
        space = space_of(kind, context)
        evaluator = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 2)
        out[kind] = evaluator.per_example_values(circuits(space)).tolist() + evaluator.full_and_empty_per_example().tolist()
    _, context = planted_context("layernorm_mlp", n_pairs=9)
    for which in ("eap", "eap_ig inputs", "eap_ig neuron"):
        module, settings = SETTINGS[which]
        out[which] = module.discover(replace(context, per_example=True), settings).per_example.flatten(1).tolist()
    return out


@pytest.mark.slow
def test_two_torchrun_ranks_give_every_example_like_one_process(tmp_path):
    import json

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    tests_dir, shared = str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])
    result = torchrun([str(script), str(tmp_path), tests_dir], python_path=(tests_dir, shared), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    single = per_example_everything()
    for rank in (0, 1):
        ranked = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, expected in single.items():
            assert torch.allclose(torch.tensor(ranked[key]), torch.tensor(expected), atol=1e-5), (rank, key)


def test_the_per_example_paths_place_their_tensors():
    """As tests/ground_truth/test_device_placement.py: tensors created without a device are meta
    here, so a forgotten `device=` fails as it would on a GPU."""
    from test_device_placement import tensors_without_a_device_are_meta

    from circuitctl.config.load import load_config
    from circuitctl.report import faithfulness_report

    _, context = planted_context("layernorm_mlp", n_pairs=6)
    space = space_of("edge", context)
    config = load_config(ROOT / "configs" / "planted-layernorm-mlp-eap.yaml", ["model.device=cpu"])
    scores, circuit = eap.discover(context, EapSettings()).scores, circuits(space, 1)[0]
    with tensors_without_a_device_are_meta():
        for module, settings in SETTINGS.values():
            result = module.discover(replace(context, per_example=True), settings)
            assert result.per_example.device.type == "cpu"
        evaluator = CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, 4)
        report = faithfulness_report(Path("circuit.json"), config, evaluator, scores, circuit, n_resamples=20)
    assert report.per_example["quantiles"] is not None and report.confidence["faithfulness"] is not None
