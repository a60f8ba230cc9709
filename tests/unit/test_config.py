from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from circuitctl.config.load import apply_overrides, config_hash, load_config, validate_config
from circuitctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "mib").glob("*.yaml"))
RUN_CONFIGS = [p for p in SHIPPED_CONFIGS if "method" in (yaml.safe_load(p.read_text()) or {})]
MIB_MODELS = {"gpt2", "Qwen/Qwen2.5-0.5B", "google/gemma-2-2b", "meta-llama/Llama-3.1-8B"}

BASE = {"model": {"path": "m"}, "task": {"name": "t"}, "method": {"name": "eap"}}


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.method.name


def test_all_errors_are_reported_at_once_with_suggestions():
    bad = {"model": {"nam": "gpt2"}, "task": {"name": "ioi"}, "method": {"name": "eap", "bach_size": 2}, "metric": "logit_dif"}
    with pytest.raises(UsageError) as info:
        validate_config(bad)
    text = str(info.value)
    assert "3 problems" in text
    assert "did you mean 'name'" in text and "did you mean 'batch_size'" in text and "did you mean 'logit_diff'" in text


def test_unknown_method_suggests_the_closest():
    with pytest.raises(UsageError, match="did you mean 'exact'"):
        validate_config({**BASE, "method": {"name": "exat"}})


def test_per_method_settings_are_checked_per_method():
    with pytest.raises(UsageError, match="candidates_per_pass"):
        validate_config({**BASE, "method": {"name": "eap", "candidates_per_pass": 3}})
    assert validate_config({**BASE, "method": {"name": "exact", "candidates_per_pass": 3}}).method.candidates_per_pass == 3


def test_overrides_use_dotted_keys_and_yaml_values():
    data = apply_overrides({**BASE, "method": {"name": "exact"}}, ["method.name=eap", "seed=3", "output.dir=runs/x", "ablation.type=zero"])
    config = validate_config(data)
    assert (config.method.name, config.seed, config.output.dir, config.ablation.type) == ("eap", 3, "runs/x", "zero")


def test_config_hash_depends_on_content_only():
    a = validate_config(BASE)
    b = validate_config({**BASE, "seed": 0})
    c = validate_config({**BASE, "seed": 1})
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_exactly_one_model_source():
    with pytest.raises(UsageError, match="exactly one of model.name"):
        validate_config({**BASE, "model": {"name": "gpt2", "path": "x"}})


def test_yaml_line_numbers_and_safe_loading(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ntask: {name: t}\nmethod: {name: eap}\nmetric: nope\n")
    with pytest.raises(UsageError, match=r"metric \(line 4\)"):
        load_config(path)
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UsageError, match="not allowed"):
        load_config(path)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_circuitctl_validate(path, tmp_path):
    """Offline and with an empty Hugging Face cache: a hub model is a note, not a failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache"), "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-c", "from circuitctl.cli.app import main; main()", "validate", str(path)],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    assert out.returncode == 0, out.stderr
    assert ("note: model" in out.stderr and "not in the Hugging Face cache" in out.stderr) == ("model: {name:" in path.read_text())


def test_mib_configs_cover_the_mib_models_with_eap_ig_and_mib_settings():
    configs = [load_config(p) for p in sorted((ROOT / "configs" / "mib").glob("*.yaml"))]
    assert {c.model.name for c in configs} == MIB_MODELS
    for c in configs:
        assert (c.method.name, c.method.variant, c.method.steps, c.method.points) == ("eap_ig", "inputs", 5, "left")
        assert c.ablation.type == "resample" and c.model.dtype == ("float32" if c.model.name == "gpt2" else "bfloat16")
    assert all(c.task.options == {"corruption": "s2_io_flip"} for c in configs if c.task.name == "ioi")


def test_validate_of_a_hub_model_uses_no_network(tmp_path, monkeypatch, capsys):
    """Not offline, nothing cached, every connection refused: validate still passes, quickly."""
    import socket

    from circuitctl.cli.app import main

    def refuse(*args, **kwargs):
        raise AssertionError("validate opened a network connection")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    try:
        main(["validate", str(ROOT / "configs" / "mib" / "llama-3.1-8b-ioi-eap-ig.yaml")])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), capsys.readouterr().err
    err = capsys.readouterr().err
    assert "is valid" in err and "not in the Hugging Face cache" in err


def test_validate_rejects_an_unknown_generator_option(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: gpt2}\ntask: {name: ioi, options: {corruptoin: abc}}\nmethod: {name: eap}\n")
    out = subprocess.run(
        [sys.executable, "-c", "from circuitctl.cli.app import main; main()", "validate", str(config)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2 and "task.options: unknown option" in out.stderr and "did you mean 'corruption'" in out.stderr, out.stderr


def test_mib_batch_sizes_are_the_memory_tables():
    """configs/mib/*-ioi-*.yaml take their batch sizes from bench/mib_batches.py (and say how to evaluate)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import mib_batches

    for path in sorted((ROOT / "configs" / "mib").glob("*-ioi-*.yaml")):
        config = load_config(path)
        shape, dtype = mib_batches.MIB_MODELS[config.model.name]
        chosen = mib_batches.choose(shape, dtype, config.task.n_pairs, 24, 76, 0.8, 256)
        assert config.model.dtype == dtype and config.method.batch_size == chosen["batch"], path.name
        text = path.read_text()
        assert f"method.batch_size={chosen['eval_batch']}" in text, path.name
        assert chosen["eval_pairs"] == config.task.n_pairs and "task.n_pairs=" not in text, path.name  # the batch cache streams


def test_a_config_validates_its_own_dump():
    """`RunConfig.model_validate(config.to_plain())` gives the same config, method settings included."""
    from circuitctl.config.load import load_config
    from circuitctl.config.methods import AcdcSettings
    from circuitctl.config.schema import RunConfig

    config = load_config(ROOT / "configs" / "demo.yaml", ["method.name=acdc", "method.tau=[0.1,0.2]", "method.tau_mode=relative"])
    again = RunConfig.model_validate(config.to_plain())
    assert again == config and isinstance(again.method, AcdcSettings) and again.method.tau == [0.1, 0.2]
