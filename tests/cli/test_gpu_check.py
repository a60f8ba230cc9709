"""bench/gpu_check.py: the smoke run on the CPU (what CI can prove of the GPU check), and the
parent's time limits with a fake worker (no torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

GPT2_ROWS = {"eap", "eap_ig_inputs", "eap_ig_activations", "cdt", "evaluation", "sfc", "path_patching", "exact", "acdc"}
MEMORY_STEPS = {"eap", "eap_ig", "engine_cache", "patched_circuits"}


def test_smoke_run_measures_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "BENCH_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        # a generous budget: the test checks that every step works, not how fast a busy CI machine is
        [sys.executable, "bench/gpu_check.py", "--smoke", "--skip-install", "--skip-tests", "--budget", "600", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = tmp_path.glob("gpu-*-smoke.json")
    payload = json.loads(result.read_text())
    rows = {r["id"]: r for r in payload["rows"]}
    statuses = {k: r["status"] for k, r in rows.items()}
    assert GPT2_ROWS <= set(rows) and all(rows[k]["status"] == "ok" for k in GPT2_ROWS), statuses
    for k in GPT2_ROWS:
        assert rows[k]["seconds"] > 0 and rows[k]["forward_passes"] > 0 and rows[k]["ratio"] > 0, rows[k]
    memory = [r for r in payload["rows"] if r.get("predict")]
    assert {r["step"] for r in memory} == MEMORY_STEPS and all(r["status"] == "ok" and r["predicted_mib"] > 0 for r in memory), statuses
    if "edge_pruning" in rows:  # the method exists in this checkout
        assert rows["edge_pruning"]["status"] == "ok", statuses
    else:
        assert "skipped" in payload["steps"]["edge pruning"]["status"]
    assert 0 < rows["acdc"]["edges_kept"] < rows["acdc"]["n_edges"]
    table = result.with_suffix(".md").read_text()
    assert "| eap | 8 |" in table and "< 1 s | n/a (not a GPU run)" in table and "| patched_circuits |" in table
    assert f"kept {rows['acdc']['edges_kept']:,} of {rows['acdc']['n_edges']:,} edges" in table
    assert table.strip() in out.stdout


FAKE_WORKER = textwrap.dedent('''
    import json, sys, time
    rows = json.load(open(sys.argv[-1]))["rows"]
    print(json.dumps({"event": "hello", "device": "Fake GPU 80GB", "device_kind": "cuda", "torch": "x", "cuda": "12"}), flush=True)
    for row in rows:
        print(json.dumps({"event": "start", "row": row["id"]}), flush=True)
        time.sleep(row["settings"]["sleep"])
        if row["settings"].get("crash"):
            sys.exit(3)
        result = {"seconds": row["settings"]["sleep"], "forward_passes": 3.0, "ratio": 2.0, "peak_mib": 10.0}
        print(json.dumps({"event": "done", "row": row["id"], "result": result}), flush=True)
''')


def fake_rows(*specs):
    return [gpu_check.Row(name, "eap", "tiny", 8, 15, 4, limit, settings=settings) for name, limit, settings in specs]


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(gpu_check, "WORKER", [sys.executable, str(script)])
    return tmp_path


def run_fake(rows, out: Path, budget: float):
    import argparse
    import time

    args = argparse.Namespace(smoke=False, budget=budget)
    report = gpu_check.Report(args, out)
    gpu_check.benchmark_step(rows, report, time.perf_counter() + budget, out / "worker.log", lambda text: None)
    return report


def test_a_row_past_its_limit_is_stopped_and_the_rest_still_run(fake_worker):
    rows = fake_rows(("eap", 10, {"sleep": 0.1}), ("acdc", 1, {"sleep": 30}), ("cdt", 10, {"sleep": 0.1}), ("crash", 10, {"sleep": 0, "crash": True}), ("last", 10, {"sleep": 0}))
    report = run_fake(rows, fake_worker, budget=60)
    status = {r["id"]: r["status"] for r in report.rows}
    assert status["eap"] == status["cdt"] == status["last"] == "ok"
    assert status["acdc"] == "stopped at its 1 s limit"
    assert status["crash"].startswith("failed: the worker died")
    saved = json.loads((fake_worker / "gpu-fake-gpu-80gb.json").read_text())  # written as it went, named by the device
    assert [r["id"] for r in saved["rows"]] == ["eap", "acdc", "cdt", "crash", "last"]
    table = (fake_worker / "gpu-fake-gpu-80gb.md").read_text()
    assert "| eap | 4 | 0.1 |" in table and "| < 1 s | pass |" in table
    assert "| acdc |" in table and "| < 180 s | - |" in table  # stopped before its target: no verdict


def test_the_budget_stops_the_run_and_names_the_rows_left(fake_worker):
    rows = fake_rows(("eap", 30, {"sleep": 0.1}), ("cdt", 30, {"sleep": 30}), ("exact", 30, {"sleep": 0.1}))
    report = run_fake(rows, fake_worker, budget=8)
    status = {r["id"]: r["status"] for r in report.rows}
    assert status["eap"] == "ok"
    assert status["cdt"] == "stopped: the 8 s budget was spent" and status["exact"].startswith("not run: the 8 s budget was spent")


def test_verdicts_against_the_targets():
    ok = {"id": "eap", "status": "ok", "seconds": 0.4, "limit_s": 90}
    assert gpu_check.verdict(ok, gpu=True) == ("< 1 s", "pass")
    assert gpu_check.verdict({**ok, "seconds": 1.5}, gpu=True) == ("< 1 s", "FAIL")
    assert gpu_check.verdict({**ok, "status": "stopped at its 200 s limit", "id": "acdc", "limit_s": 200}, gpu=True) == ("< 180 s", "FAIL (stopped)")
    assert gpu_check.verdict(ok, gpu=False)[1] == "n/a (not a GPU run)"
    assert gpu_check.verdict({**ok, "id": "exact"}, gpu=True) == ("-", "-")


def test_the_install_step_runs_the_readme_command():
    command = " ".join(gpu_check.INSTALL[3:]).replace('.[dev]', '".[dev]"')
    assert command in (ROOT / "README.md").read_text()
