from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from circuitctl.config.load import apply_overrides, config_hash, load_config, validate_config
from circuitctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "method" in (yaml.safe_load(p.read_text()) or {}))

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


def test_cli_start_up_does_not_import_torch():
    code = "import sys; from circuitctl.cli.app import _register; _register(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_circuitctl_validate(path):
    out = subprocess.run(
        [sys.executable, "-c", "from circuitctl.cli.app import main; main()", "validate", str(path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    if out.returncode != 0 and "model: {name:" in path.read_text():
        # configs for hub models (GPT-2 ...) validate except for the weights, absent offline
        assert out.returncode == 2 and "not in the Hugging Face cache" in out.stderr, out.stderr
        assert load_config(path).model.name
    else:
        assert out.returncode == 0, out.stderr


def test_a_config_validates_its_own_dump():
    """`RunConfig.model_validate(config.to_plain())` gives the same config, method settings included."""
    from circuitctl.config.load import load_config
    from circuitctl.config.methods import AcdcSettings
    from circuitctl.config.schema import RunConfig

    config = load_config(ROOT / "configs" / "demo.yaml", ["method.name=acdc", "method.tau=[0.1,0.2]", "method.tau_mode=relative"])
    again = RunConfig.model_validate(config.to_plain())
    assert again == config and isinstance(again.method, AcdcSettings) and again.method.tau == [0.1, 0.2]
