"""Every tensor the methods and evaluators create is placed on purpose: on the model's device, or
explicitly on the host. On a GPU a tensor created without a device lands on the CPU and fails
when it meets the model's tensors; here, without a GPU, the default device is set to `meta`
while the (CPU) model runs, so the same mistake fails the same way (`Tensor on device meta is not
on the expected device cpu`), inside whichever per-batch loop made it.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from helpers import planted_context
from test_circuit_spaces import KINDS, evaluator, random_circuits, space_and_context

from circuitctl.config import methods as settings

pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def tensors_without_a_device_are_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device("cpu")


def test_the_check_catches_a_tensor_created_without_a_device():
    model_tensor = torch.ones(3)
    with tensors_without_a_device_are_meta(), pytest.raises(RuntimeError, match="meta"):
        _ = model_tensor + torch.zeros(3)  # what a forgotten `device=` does on a GPU
    with tensors_without_a_device_are_meta():
        _ = model_tensor + torch.zeros(3, device=model_tensor.device)


METHODS = {
    "eap": ("eap", settings.EapSettings()),
    "exact": ("exact", settings.ExactSettings()),
    "eap_ig": ("eap_ig", settings.EapIgSettings(steps=2)),
    "eap_ig_activations": ("eap_ig", settings.EapIgSettings(steps=2, variant="activations")),
    "eap_ig_node": ("eap_ig", settings.EapIgSettings(steps=2, granularity="node")),
    "eap_ig_neuron": ("eap_ig", settings.EapIgSettings(steps=2, granularity="neuron")),
    "eap_ig_per_token": ("eap_ig", settings.EapIgSettings(steps=2, positions="per_token")),
    "acdc_incremental": ("acdc", settings.AcdcSettings(evaluator="incremental")),
    "acdc_layerwise": ("acdc", settings.AcdcSettings(evaluator="layerwise")),
    "acdc_incremental_kl": ("acdc", settings.AcdcSettings(evaluator="incremental")),
    "acdc_incremental_prob_diff": ("acdc", settings.AcdcSettings(evaluator="incremental")),
    "path_patching": ("path_patching", settings.PathPatchingSettings()),
    "cdt": ("cdt", settings.CdtSettings(decompose_qk=True)),
    "edge_pruning": ("edge_pruning", settings.EdgePruningSettings(edges=5, steps=3, sparsity_warmup_steps=2, lr_warmup_steps=1)),
    "edge_pruning_init_from": (
        "edge_pruning", settings.EdgePruningSettings(edges=5, steps=2, sparsity_warmup_steps=1, init_from="eap", cache_mib=0)
    ),
    "subnetwork_probing": ("subnetwork_probing", settings.SubnetworkProbingSettings(steps=3)),
    "ifr": ("ifr", settings.IfrSettings()),
    "ensemble": ("ensemble", settings.EnsembleSettings(members=["eap", {"name": "eap_ig", "steps": 2}, "path_patching"])),
}
METRIC = {"acdc_incremental_kl": "kl", "acdc_incremental_prob_diff": "prob_diff"}  # the others: logit_diff


@pytest.mark.parametrize("case", sorted(METHODS))
def test_every_method_places_its_tensors(case):
    from circuitctl.methods.base import run_method

    _, context = planted_context("layernorm_mlp", metric=METRIC.get(case, "logit_diff"), n_pairs=6)
    name, method_settings = METHODS[case]
    method_settings = method_settings.model_copy(update={"batch_size": 3})
    with tensors_without_a_device_are_meta():
        result = run_method(context, method_settings)
    assert result.scores.device.type == "cpu" and bool(torch.isfinite(result.scores).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_every_kind_of_circuit_evaluates_with_its_tensors_placed(kind, ablation):
    space, context = space_and_context(kind, ablation, n_pairs=6)
    keep = random_circuits(space)
    with tensors_without_a_device_are_meta():
        ev = evaluator(space, context, batch_size=3)
        values = ev.circuit_values(keep)
        ev.full_and_empty()
    assert values.device.type == "cpu"


@pytest.mark.parametrize("aggregation", ["sum", "none"])
@pytest.mark.parametrize("ablation", ["resample", "mean", "zero"])
def test_sparse_feature_circuits_place_their_tensors(aggregation, ablation):
    from test_circuit_spaces import GOLDEN

    from circuitctl.methods.sfc import find_feature_circuit
    from circuitctl.sae.loading import resolve_saes

    _, context = planted_context("mlp_neurons", ablation=ablation, n_pairs=6)
    found = resolve_saes(str(GOLDEN / "saes"), None, context.adapter.model, "cpu")
    with tensors_without_a_device_are_meta():
        result = find_feature_circuit(
            context, settings.SfcSettings(saes="x", steps=2, aggregation=aggregation, batch_size=3), {s: sae for s, (sae, _) in found.items()}
        )
    assert bool(torch.isfinite(result.scores).all())
