"""Interruptions: a run killed part-way (SIGINT, SIGKILL) resumes to the same result as an
uninterrupted run (ACDC, path patching, EAP-IG, exact patching, CD-T, SAE training), and a killed writer never leaves
a half-written circuit.json. In-process variants of the resume tests: tests/cli/test_resume_methods.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


# One intra-op thread here and in the subprocesses (`interrupt`): the models are tiny, the machine
# may be shared, and a float32 matrix product may round differently with another number of
# threads, so a resumed run is only bit-identical on the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------
WRITER = """
import sys
from circuitctl.io.files import write_json

print("ready", flush=True)
version = 0
while True:  # large files, so that a kill often lands in the middle of a write
    n = 20000 + (version % 5) * 3000
    write_json(sys.argv[1], {"version": version, "n": n, "edges": {f"e{k}": {"score": k / 7, "in_graph": k % 3 == 0} for k in range(n)}})
    version += 1
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_killed_writer_leaves_a_whole_circuit_json(tmp_path, delay):
    target = tmp_path / "circuit.json"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not target.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    process.kill()
    process.wait()
    record = json.loads(target.read_text())  # never a truncated file
    assert len(record["edges"]) == record["n"]
    # at most the one temporary file of the write that was killed is left behind
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".circuit.json.")]) <= 1


# ------------------------------------------------------------------------------------------
# ACDC: interrupt, resume, compare
# ------------------------------------------------------------------------------------------
def _discover_has_resume() -> bool:
    import typer

    from circuitctl.cli.app import _register, app

    _register()
    command = typer.main.get_command(app).commands["discover"]
    return any(param.name == "resume" for param in command.params)


needs_resume = pytest.mark.skipif(not _discover_has_resume(), reason="`circuitctl discover --resume` is not available yet")


@pytest.fixture(scope="module")
def acdc_world(tmp_path_factory) -> Path:
    """A random 2-layer model with MLPs and LayerNorm (110 edges) and 8 random pairs: ACDC
    on it takes a few seconds on a CPU."""
    from testkit import random_model, random_tokens
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("interrupt")
    fields = dict(n_layers=2, d_model=32, n_ctx=12, d_head=8, n_heads=4, d_vocab=20, act_fn="gelu", normalization_type="LN", d_mlp=64)
    model = random_model(5, **fields)
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(fields))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model" / "model.safetensors"))
    clean, corrupt = random_tokens(8, 10, 20, 1).tolist(), random_tokens(8, 10, 20, 2).tolist()
    with open(root / "pairs.jsonl", "w") as handle:
        for c, k in zip(clean, corrupt):
            handle.write(json.dumps({"clean": c, "corrupt": k, "answers": [c[0]], "wrong_answers": [k[0]]}) + "\n")
    config = {
        "model": {"path": str(root / "model"), "device": "cpu"},
        "task": {"path": str(root / "pairs.jsonl")},
        # checkpoint after every step, so that a kill always lands after some progress
        "method": {"name": "acdc", "tau": 0.02, "checkpoint_every_seconds": 0.0, "candidates_per_pass": 4},
        "metric": "kl",
        "output": {"dir": str(root / "reference")},
    }
    (root / "acdc.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def cli(args: list[str], capsys) -> tuple[int, str]:
    from circuitctl.cli.app import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def comparable(run_dir: Path) -> dict:
    """circuit.json without what may differ between an uninterrupted and a resumed run."""
    record = json.loads((run_dir / "circuit.json").read_text())
    for key in ("created", "timings"):
        record.pop(key)
    record["config"].pop("output")
    return record


def checkpoint_generation(state: Path) -> int:
    """How many times the run has saved its progress (0 before the first save)."""
    try:
        return json.loads(state.read_text())["generation"]
    except (OSError, ValueError, KeyError):
        return 0


def interrupt(args: list[str], out: Path, generations: int, how: signal.Signals) -> dict:
    """Run `circuitctl ARGS` in a subprocess and send it `how` once it has saved its checkpoint
    in `out` `generations` times; returns the checkpoint's record (whole, even after SIGKILL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # as `one_thread`
    process = subprocess.Popen(
        [sys.executable, "-m", "circuitctl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while checkpoint_generation(state) < generations and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted: make it longer"
    process.send_signal(how)
    _, err = process.communicate(timeout=120)
    if how == signal.SIGINT:
        assert process.returncode == 130, err
        assert "--resume" in err and "Traceback" not in err
    else:
        assert process.returncode == -signal.SIGKILL
    return json.loads(state.read_text())


SIGNALS = pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])


@needs_resume
@SIGNALS
def test_interrupted_acdc_resumes_to_the_same_circuit(acdc_world, how, tmp_path, capsys):
    config = str(acdc_world / "acdc.yaml")
    reference = acdc_world / "reference"
    if not (reference / "circuit.json").exists():
        code, err = cli(["discover", config], capsys)
        assert code == 0, err

    run = tmp_path / "run"
    # ACDC saves after every step (about 55 in this run): interrupt after 15 of them
    saved = interrupt(["discover", config, f"output.dir={run}"], run, 15, how)
    assert not (run / "circuit.json").exists()  # no result from an unfinished run
    assert saved["method"] == "acdc"

    code, err = cli(["discover", config, f"output.dir={run}", "--resume", str(run)], capsys)
    assert code == 0, err
    assert comparable(run) == comparable(reference)  # edges, scores, membership, metrics, counts
    assert not (run / "checkpoint").exists()  # a finished run leaves nothing to resume


# ------------------------------------------------------------------------------------------
# Path patching, EAP-IG, exact patching and CD-T: interrupt, resume, compare, and count the
# work of the resumed run
# ------------------------------------------------------------------------------------------
RESUMABLE = {
    # path patching saves after each of its 54 receivers (one batched evaluation each)
    "path_patching": {"name": "path_patching", "threshold": 0.1, "senders_per_pass": 8, "checkpoint_every_seconds": 0.0},
    # EAP-IG saves after each of its 8 batches (one example, 20 gradient passes each)
    "eap_ig": {"name": "eap_ig", "steps": 20, "batch_size": 1, "checkpoint_every_seconds": 0.0},
    # exact patching saves after each of its 8 x 29 units (a chunk of at most 4 edges on one example)
    "exact": {"name": "exact", "batch_size": 1, "candidates_per_pass": 4, "checkpoint_every_seconds": 0.0},
    # CD-T saves after each of its 8 batches (one example, one source per decomposed pass)
    "cdt": {"name": "cdt", "batch_size": 1, "sources_per_pass": 1, "checkpoint_every_seconds": 0.0},
}
# interrupt after this many checkpoints (2 unless named): exact patching into its second example
INTERRUPT_AFTER = {"path_patching": 10, "exact": 40}


def count_work(monkeypatch, method: str) -> list:
    """Record the units of work of in-process runs: path patching's receiver evaluations, EAP-IG's
    gradient passes, exact patching's chunks of edges patched on a batch, CD-T's batches (edge scores)."""
    calls: list = []
    if method in ("exact", "cdt"):
        from circuitctl.methods import cdt, exact

        module, name = (exact, "_chunk_effects") if method == "exact" else (cdt, "edge_scores")
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: (calls.append(a), original(*a, **k))[1])
    elif method == "path_patching":
        from circuitctl.methods import path_patching as pp

        original = pp.batched_evaluator

        def batched_evaluator(*args, **kwargs):
            evaluate, clean_value, changed = original(*args, **kwargs)
            return (lambda *a: (calls.append(a), evaluate(*a))[1]), clean_value, changed

        monkeypatch.setattr(pp, "batched_evaluator", batched_evaluator)
    else:
        from circuitctl.methods import eap_ig

        gradient_pass = eap_ig.gradient_pass
        monkeypatch.setattr(eap_ig, "gradient_pass", lambda *a, **k: (calls.append(a), gradient_pass(*a, **k))[1])
    return calls


def work_left(method: str, reference: dict, saved: dict) -> int:
    """The units of work a resume from `saved` must still do: receivers, examples x steps,
    examples x chunks of edges (exact) or examples (CD-T); the batches hold one example each."""
    state, n_pairs = saved["state"], reference["task"]["n_pairs"]
    if method == "path_patching":
        total, done = reference["results"]["path_patching"]["receivers_expanded"], state["receivers_done"]
    elif method == "eap_ig":
        steps = RESUMABLE["eap_ig"]["steps"]
        total, done = n_pairs * steps, state["examples_done"] * steps
    elif method == "exact":
        total, done = n_pairs * state["n_chunks"], state["examples_done"] * state["n_chunks"] + state["chunks_done"]
    else:
        total, done = n_pairs, state["examples_done"]
    assert 0 < done < total, "interrupt part-way"
    return total - done


@needs_resume
@SIGNALS
@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_interrupted_method_resumes_to_the_same_circuit(acdc_world, method, how, tmp_path, capsys, monkeypatch):
    config = acdc_world / f"{method}.yaml"
    reference = acdc_world / f"{method}-reference"
    if not config.exists():
        record = yaml.safe_load((acdc_world / "acdc.yaml").read_text())
        record.update(method=RESUMABLE[method], metric="logit_diff", output={"dir": str(reference)})
        config.write_text(yaml.safe_dump(record, sort_keys=False))
    if not (reference / "circuit.json").exists():
        code, err = cli(["discover", str(config)], capsys)
        assert code == 0, err

    run = tmp_path / "run"
    saved = interrupt(["discover", str(config), f"output.dir={run}"], run, INTERRUPT_AFTER.get(method, 2), how)
    assert saved["method"] == method and not (run / "circuit.json").exists()

    calls = count_work(monkeypatch, method)
    code, err = cli(["discover", str(config), f"output.dir={run}", "--resume", str(run)], capsys)
    assert code == 0, err
    expected = comparable(reference)
    assert len(calls) == work_left(method, expected, saved)  # the finished work was not done again
    assert comparable(run) == expected  # edges, scores, membership, metrics, counts
    assert not (run / "checkpoint").exists()


# ------------------------------------------------------------------------------------------
# SAE training: interrupt, resume with train-sae --resume, compare the weights
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_world(tmp_path_factory) -> Path:
    """The planted MLP-neuron model and its task's prompts: 2000 steps of two small SAEs take
    about 2 s on a CPU, with a checkpoint every 0.2 s."""
    from circuitctl.testing.planted import build, export

    root = tmp_path_factory.mktemp("sae")
    export(build("mlp_neurons"), root / "model", root / "task")
    config = {
        "model": {"path": str(root / "model"), "device": "cpu"},
        "sites": ["attn0", "mlp0"],
        "d_sae": 32,
        "l1": 0.5,
        "steps": 2000,
        "batch_size": 64,
        "lr": 0.003,
        "tokens": {"type": "task", "path": str(root / "task")},
        "output": {"dir": str(root / "reference")},
        "checkpoint_every_seconds": 0.2,
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def trained(out: Path) -> dict:
    """The SAE files (bytes) and metrics.json without what may differ between identical trainings."""
    files = {f"{site}/{name}": (out / site / name).read_bytes() for site in ("attn0", "mlp0") for name in ("cfg.json", "sae_weights.safetensors")}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("created", "seconds", "config"):
        metrics.pop(key)
    for entry in metrics["saes"]:
        entry.pop("seconds")
    return {"files": files, "metrics": metrics}


@SIGNALS
def test_interrupted_sae_training_resumes_to_the_same_weights(sae_world, how, tmp_path, capsys, monkeypatch):
    config = str(sae_world / "train.yaml")
    reference = sae_world / "reference"
    if not (reference / "metrics.json").exists():
        code, err = cli(["train-sae", config], capsys)
        assert code == 0, err

    out = tmp_path / "saes"
    saved = interrupt(["train-sae", config, f"output.dir={out}"], out, 2, how)
    assert saved["method"] == "train_sae" and 0 < saved["state"]["step"] < 2000
    assert not (out / "metrics.json").exists()

    from contextlib import contextmanager

    import circuitctl.sae.train as train

    advanced: list[int] = []

    @contextmanager
    def recording_bar(description, total):
        yield lambda n=1: advanced.append(n)

    monkeypatch.setattr(train, "bar", recording_bar)
    code, err = cli(["train-sae", config, f"output.dir={out}", "--resume", str(out)], capsys)
    assert code == 0, err
    step = saved["state"]["step"]
    assert advanced == [step] + [1] * (2000 - step)  # continued after the saved steps
    assert trained(out) == trained(reference)  # the same weights, bit for bit on the CPU
    assert not (out / "checkpoint").exists()


def test_finished_unit_circuit_run_leaves_no_checkpoint(acdc_world, tmp_path, capsys):
    """Node / neuron / per-position circuits are written by their own path: it must clear the
    checkpoint too, or a later --resume would redo a finished run."""
    record = yaml.safe_load((acdc_world / "acdc.yaml").read_text())
    record.update(method={**RESUMABLE["eap_ig"], "steps": 2, "granularity": "node"}, metric="logit_diff", output={"dir": str(tmp_path / "run")})
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(record, sort_keys=False))
    code, err = cli(["discover", str(config)], capsys)
    assert code == 0, err
    assert (tmp_path / "run" / "circuit.json").exists()
    assert not (tmp_path / "run" / "checkpoint").exists()
