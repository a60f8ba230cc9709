"""Every kind of circuit through one evaluator: the same loop for edges, nodes, neurons,
per-position edges and nodes and SAE features, and what that loop guarantees for each kind
(torchrun ranks agree with one process, out-of-memory halving, the configured ablation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import planted_context
from testkit import torchrun

from circuitctl.batching import collect_notes
from circuitctl.circuits.evaluator import CircuitEvaluator

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "v1"
KINDS = ("edge", "node", "neuron", "positional_edge", "positional_node", "feature", "feature_per_position")

pytestmark = pytest.mark.usefixtures("one_thread")


def space_and_context(kind: str, ablation: str = "resample", n_pairs: int | None = None):
    """(space, context) of a small planted model for each kind of circuit."""
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.features import FeatureSpace
    from circuitctl.circuits.neurons import NeuronSpace
    from circuitctl.circuits.nodes import NodeSpace
    from circuitctl.circuits.positional import PositionalEdgeSpace, PositionalNodeSpace
    from circuitctl.graph.positional import PositionalGraph
    from circuitctl.graph.positions import PositionLayout

    name = {"neuron": "mlp_neurons", "feature": "mlp_neurons", "feature_per_position": "mlp_neurons"}.get(kind, "v_composition")
    if kind in ("edge", "node"):
        name = "layernorm_mlp"
    _, context = planted_context(name, ablation=ablation, n_pairs=n_pairs)
    graph = context.graph
    if kind == "edge":
        return EdgeSpace(graph), context
    if kind == "node":
        return NodeSpace(graph), context
    if kind == "neuron":
        return NeuronSpace(graph, context.adapter.cfg.d_mlp), context
    if kind.startswith("positional"):
        pgraph = PositionalGraph.from_data(graph, context.data)
        return (PositionalEdgeSpace if kind == "positional_edge" else PositionalNodeSpace)(pgraph), context
    from circuitctl.sae.loading import resolve_saes

    found = resolve_saes(str(GOLDEN / "saes"), None, context.adapter.model, "cpu")
    layout = PositionLayout.from_data(context.data) if kind == "feature_per_position" else None
    return FeatureSpace({s: sae for s, (sae, _) in found.items()}, {}, layout), context


def random_circuits(space, k: int = 3, seed: int = 0) -> torch.Tensor:
    keep = torch.rand(k, *space.mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    return keep & space.mask


def evaluator(space, context, batch_size: int = 8) -> CircuitEvaluator:
    return CircuitEvaluator(space, context.adapter, context.data, context.metric, context.ablation, batch_size)


@pytest.mark.parametrize("kind", KINDS)
def test_keeping_everything_is_the_model_and_keeping_nothing_is_the_ablated_model(kind):
    space, context = space_and_context(kind)
    ev = evaluator(space, context)
    full, empty = ev.full_and_empty()
    everything = float(ev.circuit_values(space.mask[None].clone())[0])
    assert everything == pytest.approx(full, abs=1e-4)
    assert abs(full - empty) > 0.5  # the planted task has a real gap
    if kind in ("edge", "node", "positional_edge", "positional_node"):
        data = context.data
        clean, corrupt = (context.adapter.run(tokens, data.answer_positions).logits for tokens in (data.clean, data.corrupt))
        reference = context.metric(corrupt, data, clean).double().mean()
        assert empty == pytest.approx(float(reference), abs=1e-4)  # everything resampled: the corrupt run


@pytest.mark.parametrize("kind", KINDS)
def test_out_of_memory_halves_the_batch_for_every_kind(kind, monkeypatch):
    space, context = space_and_context(kind)
    keep = random_circuits(space)
    expected = evaluator(space, context).circuit_values(keep)
    halving = evaluator(space, context)
    original = halving.patcher.logits
    rows = []

    def failing(state, masks):
        rows.append(state.n)
        if state.n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(state, masks)

    monkeypatch.setattr(halving.patcher, "logits", failing)
    with collect_notes() as notes:
        values = halving.circuit_values(keep)
    assert torch.allclose(values, expected, atol=1e-5)
    assert rows[0] == 8 and max(rows[3:]) <= 2
    assert any("continuing with 4" in note for note in notes)


def test_feature_evaluation_follows_the_ablation():
    """The SAE sites of the 1-layer planted model end at resid0, the final residual stream, so
    ablating every node replaces it by its ablation value: the corrupt run's (resample), the
    mean of the clean runs (mean: decoding is affine, so decode(mean f) + mean e = mean x), or
    decode(0) (zero). References with TransformerLens hooks."""
    space, context = space_and_context("feature")
    model, data = context.adapter.model, context.data
    sae = next(sae for site, sae in space.saes.items() if site.name == "resid0")
    with torch.no_grad():
        _, cache = model.run_with_cache(data.clean, names_filter="blocks.0.hook_resid_post")
        clean_resid = cache["blocks.0.hook_resid_post"]
        real = data.real_tokens[..., None].float()
        mean_resid = (clean_resid * real).sum(0, keepdim=True) / real.sum(0, keepdim=True).clamp(min=1)
        references = {
            "resample": model(data.corrupt),
            "mean": model.run_with_hooks(data.clean, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: mean_resid.expand_as(x))]),
            "zero": model.run_with_hooks(data.clean, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: sae.decode(torch.zeros(1, 1, sae.d_sae)).expand_as(x))]),
        }
    rows = torch.arange(data.n)
    values = {}
    for ablation, logits in references.items():
        space, context = space_and_context("feature", ablation)
        empty = evaluator(space, context).full_and_empty()[1]
        values[ablation] = empty
        expected = context.metric(logits[rows, data.answer_positions], data, None).double().mean()
        assert empty == pytest.approx(float(expected), abs=1e-4), ablation
    assert values["resample"] != pytest.approx(values["mean"], abs=0.1)  # the ablations differ on this task


# ----------------------------------------------------------------------------------------------
# torchrun: every kind evaluates this rank's examples and all-reduces
# ----------------------------------------------------------------------------------------------
DRIVER = '''
import json, sys
from pathlib import Path
import torch
from circuitctl import distributed
distributed.init_from_env("cpu")
sys.path.insert(0, sys.argv[2])
from test_circuit_spaces import KINDS, evaluator, random_circuits, space_and_context

out = {}
for kind in KINDS:
    for ablation in ("resample", "mean"):
        space, context = space_and_context(kind, ablation, n_pairs=9)  # odd: shards of 4 and 5
        ev = evaluator(space, context, batch_size=3)
        full, empty = ev.full_and_empty()
        out[f"{kind}-{ablation}"] = [full, empty] + ev.circuit_values(random_circuits(space)).tolist()
Path(sys.argv[1], f"rank{distributed.rank()}.json").write_text(json.dumps(out))
'''


@pytest.mark.slow
def test_two_torchrun_ranks_evaluate_every_kind_like_one_process(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    tests_dir = str(Path(__file__).parent)
    shared = str(Path(__file__).resolve().parents[1])  # tests/: helpers
    result = torchrun([str(script), str(tmp_path), tests_dir], python_path=(tests_dir, shared), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = {}
    for kind in KINDS:
        for ablation in ("resample", "mean"):
            space, context = space_and_context(kind, ablation, n_pairs=9)
            ev = evaluator(space, context, batch_size=3)
            single[f"{kind}-{ablation}"] = [*ev.full_and_empty(), *ev.circuit_values(random_circuits(space)).tolist()]
    for key, expected in single.items():
        for rank in ranks:
            assert rank[key] == pytest.approx(expected, abs=1e-5), key
