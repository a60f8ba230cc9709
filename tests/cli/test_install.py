"""A regular (non-editable) install works from any directory: the shipped tasks, models and
configs are package data found through importlib.resources, not paths into the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_regular_install_runs_the_demo_and_copies_tasks_from_an_empty_directory(tmp_path):
    venv = tmp_path / "venv"
    # the venv sees this machine's packages (torch, TransformerLens, ...), so pip installs circuitctl alone
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python, circuitctl = venv / "bin" / "python", venv / "bin" / "circuitctl"
    install = [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(ROOT)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], cwd=empty, env=env, capture_output=True, text=True, timeout=600)

    where = run(str(python), "-c", "import circuitctl; print(circuitctl.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the installed copy, not the checkout
    demo = run(str(circuitctl), "discover", str(ROOT / "configs" / "demo.yaml"), "output.dir=x")
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (empty / "x" / "circuit.json").is_file() and (empty / "x" / "circuit.mib.json").is_file()
    copied = run(str(circuitctl), "cp", "toy-ioi", "mytask")
    assert copied.returncode == 0, copied.stderr
    assert (empty / "mytask" / "task.yaml").is_file() and (empty / "mytask" / "pairs.jsonl").is_file()
    by_name = run(str(circuitctl), "validate", "demo")
    assert by_name.returncode == 0, by_name.stderr
