"""model.n_devices (TransformerLens's split of the layers over GPUs): validated, passed through,
and refused above 1 until the adapter moves activations between devices."""

from __future__ import annotations

import pytest

from circuitctl.config.load import validate_config
from circuitctl.errors import UsageError
from circuitctl.models import adapter as adapter_module

BASE = {"model": {"name": "gpt2"}, "task": {"name": "t"}, "method": {"name": "eap"}}


def config(**model):
    return validate_config({**BASE, "model": {**BASE["model"], **model}})


def test_config_accepts_one_device_and_defaults_to_it():
    assert config().model.n_devices == 1
    assert config(n_devices=1).model.n_devices == 1


@pytest.mark.parametrize("value, message", [(0, "greater than or equal to 1"), ("two", "integer"), (2, "not supported yet")])
def test_config_rejects_bad_and_unsupported_values_before_loading(value, message):
    with pytest.raises(UsageError, match="model.n_devices") as info:
        config(n_devices=value)
    assert message in str(info.value)


class _Loaded(Exception):
    pass


def _capture_from_pretrained(monkeypatch) -> dict:
    from transformer_lens import HookedTransformer

    seen: dict = {}

    def fake(name, **kwargs):
        seen.update(kwargs, name=name)
        raise _Loaded  # stop before anything is downloaded

    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(fake))
    return seen


def test_pretrained_loading_passes_n_devices_through(monkeypatch):
    seen = _capture_from_pretrained(monkeypatch)
    cfg = config(device="cpu").model
    with pytest.raises(UsageError):  # load_model reports the stub's exception as a load failure
        adapter_module.load_model(cfg.name, None, cfg.device, cfg.dtype, cfg.n_devices)
    assert seen["name"] == "gpt2" and seen["n_devices"] == 1 and seen["device"] == "cpu"


def test_more_than_one_device_is_refused_before_loading(monkeypatch):
    seen = _capture_from_pretrained(monkeypatch)
    with pytest.raises(UsageError, match="n_devices is 2.*not supported yet"):
        adapter_module.load_model("gpt2", None, "cpu", "float32", n_devices=2)
    assert not seen  # from_pretrained was never called


def test_local_checkpoints_get_n_devices_in_their_config(tmp_path):
    from circuitctl.testing.planted import build, export

    model_dir, _ = export(build("layernorm_mlp"), tmp_path / "model", tmp_path / "task")
    model = adapter_module.load_model(None, model_dir, "cpu", "float32", n_devices=1)
    assert model.cfg.n_devices == 1
    with pytest.raises(UsageError, match="n_devices is 3"):
        adapter_module.load_model(None, model_dir, "cpu", "float32", n_devices=3)


def test_the_adapter_refuses_a_model_split_over_devices(ln_mlp_model):
    ln_mlp_model.cfg.n_devices = 2  # as TransformerLens would set it (it needs 2 GPUs to build one)
    with pytest.raises(UsageError, match="n_devices is 2"):
        adapter_module.ModelAdapter(ln_mlp_model)
