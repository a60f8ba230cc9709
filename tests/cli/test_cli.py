"""The CLI end to end on a shipped model: discover, evaluate, never overwrite silently."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", "from circuitctl.cli.app import main; main()", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cli")
    config = work / "demo.yaml"
    config.write_text((ROOT / "configs" / "planted-layernorm-mlp-eap.yaml").read_text().replace("models/", f"{ROOT}/models/"))
    result = cli("discover", str(config), "output.dir=runs/demo", cwd=work)
    assert result.returncode == 0, result.stderr
    return work, config, result


def test_discover_writes_every_output(demo_run):
    work, _, result = demo_run
    run = work / "runs" / "demo"
    for name in ("circuit.json", "circuit.mib.json", "circuit.dot", "config.yaml"):
        assert (run / name).is_file(), name
    if shutil.which("dot"):
        assert (run / "circuit.svg").read_text().lstrip().startswith("<?xml")
    record = json.loads((run / "circuit.json").read_text())
    for key in ("schema_version", "model", "task", "method", "config", "config_hash", "library_versions", "seed", "timings"):
        assert key in record, key
    true_edges = set((ROOT / "tasks" / "planted-layernorm-mlp" / "true_edges.txt").read_text().split())
    kept = {name for name, edge in record["edges"].items() if edge["in_graph"]}
    assert true_edges <= kept
    assert record["results"]["faithfulness"] >= 0.95
    mib = json.loads((run / "circuit.mib.json").read_text())
    assert set(mib) == {"cfg", "nodes", "edges"} and mib["edges"].keys() == record["edges"].keys()
    assert "faithfulness f(C)" in result.stdout


def test_an_existing_run_is_never_overwritten_silently(demo_run):
    work, config, _ = demo_run
    circuit = work / "runs" / "demo" / "circuit.json"
    before = circuit.read_bytes()
    result = cli("discover", str(config), "output.dir=runs/demo", cwd=work)
    assert result.returncode == 2
    assert "holds an earlier run" in result.stderr and "Traceback" not in result.stderr
    assert circuit.read_bytes() == before


def test_evaluate_faithfulness_on_our_file_and_the_mib_file(demo_run):
    work, _, _ = demo_run
    run = work / "runs" / "demo"
    known = ROOT / "tasks" / "planted-layernorm-mlp" / "true_edges.txt"
    result = cli("evaluate", "faithfulness", str(run / "circuit.json"), "--known", str(known), cwd=work)
    assert result.returncode == 0, result.stderr
    report = json.loads((run / "faithfulness.json").read_text())
    assert report["faithfulness"] >= 0.95 and report["completeness"] < 0.2
    assert report["known_circuit"]["recall"] == 1.0 and report["known_circuit"]["roc_auc"] == 1.0
    assert len(report["curve_signed"]) == 10 and report["curve_absolute"][-1] == pytest.approx(1.0, abs=1e-4)
    assert (run / "faithfulness_curve.png").read_bytes()[:4] == b"\x89PNG"
    for word in ("CPR", "CMD", "completeness"):
        assert word in result.stdout
    again = cli("evaluate", "faithfulness", str(run / "circuit.json"), cwd=work)
    assert again.returncode == 2 and "already exists" in again.stderr
    other = cli("evaluate", "faithfulness", str(run / "circuit.mib.json"), "--config", str(run / "config.yaml"), "--out", str(work / "mib-eval"), cwd=work)
    assert other.returncode == 0, other.stderr
    assert json.loads((work / "mib-eval" / "faithfulness.json").read_text())["faithfulness"] == pytest.approx(report["faithfulness"])


def test_validate_and_help_are_fast_and_clear(tmp_path):
    assert cli("validate", str(ROOT / "configs" / "planted-layernorm-mlp-eap.yaml"), cwd=ROOT).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\ntask: {name: t}\nmethod: {name: eapp}\n")
    result = cli("validate", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and "did you mean 'eap'" in result.stderr and "Traceback" not in result.stderr
    assert cli("--help", cwd=tmp_path).returncode == 0
