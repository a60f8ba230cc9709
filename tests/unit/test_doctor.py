"""`circuitctl doctor`: the rows it reports and the advice for missing pieces."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import torch

from circuitctl import doctor


def rows() -> dict[str, doctor.Check]:
    return {check.name: check for check in doctor.run_checks()}


def test_reports_versions_devices_and_tools(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checks = rows()
    assert {"Python", "torch", "CUDA", "TransformerLens", "Graphviz dot", "HF offline mode", "HF cache"} <= set(checks)
    assert checks["Python"].found.startswith(platform.python_version())
    assert checks["torch"].found.startswith(torch.__version__) and checks["torch"].status == "ok"
    assert checks["TransformerLens"].status == "ok"
    assert checks["HF offline mode"].found.startswith("on")
    cuda = checks["CUDA"]
    if torch.cuda.is_available():
        assert cuda.status == "ok" and "cuda:0" in cuda.found
    else:
        assert cuda.status == "warning" and cuda.fix  # says what to do


def test_missing_graphviz_says_how_to_install(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    check = doctor.check_graphviz()
    assert check.status == "missing" and not check.required
    assert "apt-get install graphviz" in check.fix and "brew install graphviz" in check.fix


def test_missing_transformer_lens_is_required(monkeypatch):
    monkeypatch.setattr(doctor, "_version", lambda package: None)
    check = doctor.check_transformer_lens()
    assert check.status == "missing" and check.required and "pip install" in check.fix
    monkeypatch.setattr(doctor, "_version", lambda package: "4.1.0")
    assert doctor.check_transformer_lens().status == "warning"


def test_hf_cache_lists_cached_models(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert "no models cached" in doctor.check_hf_cache().found
    (tmp_path / "models--EleutherAI--pythia-70m" / "snapshots").mkdir(parents=True)
    assert "EleutherAI/pythia-70m" in doctor.check_hf_cache().found


def test_cli_prints_the_table(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "circuitctl", "doctor"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("Python", "torch", "CUDA", "TransformerLens", "Graphviz dot", "HF offline mode", "HF cache", "what to do"):
        assert name in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout  # the environment line
