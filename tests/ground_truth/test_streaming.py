"""Memory that does not grow with the number of examples: the engine's batch cache keeps batches on
the device up to a budget, then on the host, then recomputes them; results are the same."""

from __future__ import annotations

import pytest
import torch
from helpers import planted_context
from test_circuit_spaces import KINDS, evaluator, random_circuits, space_and_context

from circuitctl.batching import collect_notes
from circuitctl.config.methods import AcdcSettings
from circuitctl.methods import acdc
from circuitctl.patching.cache import BatchCache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["host", "recompute"])
def test_evaluation_streams_batches_with_the_same_results(kind, where):
    space, context = space_and_context(kind, "mean", n_pairs=9)
    keep = random_circuits(space)
    in_memory = evaluator(space, context, batch_size=3)
    expected = [*in_memory.full_and_empty(), *in_memory.circuit_values(keep).tolist()]
    streamed = evaluator(space, context, batch_size=3)
    streamed.engine.cache = BatchCache(context.adapter.device, device_gib=0, host_gib=0 if where == "recompute" else None)
    with collect_notes() as notes:
        values = [*streamed.full_and_empty(), *streamed.circuit_values(keep).tolist()]
    assert values == pytest.approx(expected, abs=1e-6)
    assert streamed.engine.cache.counts[where] == 3 and streamed.engine.cache.counts["device"] == 0
    assert any("activation cache: 0 batch(es) kept on the device" in note for note in notes)


@pytest.mark.parametrize("metric", ["logit_diff", "kl"])
def test_acdc_with_a_small_cache_finds_the_in_memory_circuit(metric):
    _, context = planted_context("layernorm_mlp", metric=metric, n_pairs=9)
    tau = 0.02 if metric == "kl" else 0.5
    in_memory = acdc.discover(context, AcdcSettings(tau=tau, batch_size=3))
    assert in_memory.extra["evaluator"] == "incremental"
    small = context.__class__(**{**context.__dict__, "cache_gib": 0.0})
    with collect_notes():
        streamed = acdc.discover(small, AcdcSettings(tau=tau, batch_size=3))
    assert streamed.extra["evaluator"].startswith("layerwise (the incremental tables exceed the cache budget")
    assert torch.equal(streamed.membership, in_memory.membership)
    assert torch.allclose(streamed.scores, in_memory.scores, atol=1e-5)
