"""Reliability, second round: degenerate tasks, full disks, two runs in one directory, corrupt
checkpoints, hostile names and huge task files, each through the real CLI where it can be.

In-process runs go through the CLI's entry point (`circuitctl.cli.app.main`); runs that need a
process of their own (a file-size limit, a lock held by another process, a process stopped or
killed part-way) run `python -m circuitctl` exactly as a user does. Random-input robustness of
`validate` and `discover` (Hypothesis): tests/test_fuzz.py.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from helpers import planted_module

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (tests/conftest.py)

MESSAGE = re.compile(r"^(error|Error|internal error):", re.MULTILINE)


# ------------------------------------------------------------------------------------------
# The world: a planted model (copy_first: the answer is the first token), its task, runners
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    planted = planted_module()
    root = tmp_path_factory.mktemp("reliability2")
    model, task = planted.export(planted.build("copy_first"), root / "model", root / "task")
    pairs = [json.loads(line) for line in (task / "pairs.jsonl").read_text().splitlines()]
    return {"root": root, "model": model, "task": task, "pairs": pairs}


def config_text(model: Path, task: Path, output: Path | None = None, method: dict | str = "eap", **extra) -> str:
    config = {"model": {"path": str(model), "device": "cpu"}, "task": {"path": str(task)}}
    config["method"] = {"name": method} if isinstance(method, str) else method
    if output is not None:
        config["output"] = {"dir": str(output)}
    config.update(extra)
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def write_config(directory: Path, text: str, name: str = "run.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory / name


def write_pairs(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    from circuitctl.cli.app import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(args: list[str], cwd: Path | None = None, limit_bytes: int | None = None, timeout: float = 300):
    """Run ``python -m circuitctl`` in a process of its own (with a file-size limit: `ulimit -f`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "circuitctl", *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=limit,
    )


def one_error(code: int, out: str, err: str, *expected: str) -> None:
    """Exit 2, one message naming the problem, no traceback."""
    context = f"exit {code}\nstdout={out}\nstderr={err}"
    assert code == 2, context
    assert "Traceback" not in err + out, context
    assert len(MESSAGE.findall(err)) == 1, context
    flat = " ".join(err.split())  # rich wraps long lines
    for part in expected:
        assert part in flat, f"expected {part!r}\n{context}"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# 1. Degenerate tasks
# ------------------------------------------------------------------------------------------
def test_task_without_signal_is_refused_and_allowed_on_request(world, tmp_path, capsys):
    """Every corrupt prompt equal to its clean prompt: refused before the method runs, with the
    gap and its standard error; --allow-small-gap or checks.allow_small_gap runs it anyway."""
    same = write_pairs(tmp_path / "same.jsonl", [dict(p, corrupt=p["clean"]) for p in world["pairs"]])
    config = write_config(tmp_path, config_text(world["model"], same, tmp_path / "run"))
    code, out, err = cli(["discover", config], capsys)
    one_error(code, out, err, "every corrupt prompt equals its clean prompt (24 of 24 pairs)", "gap 0", "standard error 0 over 24 pairs", "--allow-small-gap")
    assert not (tmp_path / "run").exists()

    code, out, err = cli(["discover", config, "--allow-small-gap"], capsys)
    assert code == 0, err
    signal_record = json.loads((tmp_path / "run" / "circuit.json").read_text())["task_signal"]
    assert signal_record["gap"] == 0 and signal_record["identical_pairs"] == 24
    assert any("allowed by checks.allow_small_gap" in w for w in signal_record["warnings"])
    assert "allowed by checks.allow_small_gap" in " ".join(out.split())

    switched = write_config(tmp_path, config_text(world["model"], same, tmp_path / "run2", checks={"allow_small_gap": True}), "switched.yaml")
    assert cli(["discover", switched], capsys)[0] == 0


def test_tiny_gap_is_refused(world, tmp_path, capsys):
    """Corrupt prompts that differ only where the model does not look: a gap of 0 next to a metric of 5."""
    records = [dict(p, corrupt=p["clean"][:3] + [(p["clean"][3] + 1) % 12] + p["clean"][4:]) for p in world["pairs"]]
    task = write_pairs(tmp_path / "tiny.jsonl", records)
    code, out, err = cli(["discover", write_config(tmp_path, config_text(world["model"], task, tmp_path / "run"))], capsys)
    one_error(code, out, err, "clean-corrupt gap of metric 'logit_diff' is tiny", "m(full) 5", "m(empty) 5", "standard error")


def test_answer_equal_to_wrong_answer_is_refused_at_validation(world, tmp_path, capsys):
    bad = dict(world["pairs"][0], wrong_answers=[world["pairs"][0]["answers"][0]])
    task = write_pairs(tmp_path / "same_answer.jsonl", [world["pairs"][1], bad])
    code, out, err = cli(["validate", write_config(tmp_path, config_text(world["model"], task))], capsys)
    one_error(code, out, err, "same_answer.jsonl line 2", "is both an answer and a wrong answer")


def test_answers_that_are_the_same_token_are_refused(world, tmp_path, capsys):
    """'w2' and ' w2' differ as text but are one token of a whitespace tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tmp_path / "tok_model"
    shutil.copytree(world["model"], model)
    tokenizer = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(12)} | {"<unk>": 12}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(model / "tokenizer.json"))
    (model / "special_tokens.json").write_text(json.dumps({"unk_token": "<unk>"}))
    record = {"clean": "w2 w1 w5", "corrupt": "w9 w1 w5", "answers": ["w2"], "wrong_answers": [" w2"]}
    task = write_pairs(tmp_path / "pairs.jsonl", [record])
    code, out, err = cli(["discover", write_config(tmp_path, config_text(model, task, tmp_path / "run"))], capsys)
    one_error(code, out, err, "pairs.jsonl line 1", "answer and a wrong answer are the same token (id 2)")


def test_mean_ablation_over_one_example(world, tmp_path, capsys):
    """Refused per position (the mean is the example itself: nothing is ablated); over all
    positions it runs with a warning."""
    task = write_pairs(tmp_path / "one.jsonl", world["pairs"][:1])
    per_position = config_text(world["model"], task, tmp_path / "run", ablation={"type": "mean", "per_position": True})
    code, out, err = cli(["discover", write_config(tmp_path, per_position)], capsys)
    one_error(code, out, err, "ablation: mean over a single example", "1 pair: no standard error")
    pooled = config_text(world["model"], task, tmp_path / "run2", ablation={"type": "mean", "per_position": False})
    code, out, err = cli(["discover", write_config(tmp_path, pooled, "pooled.yaml")], capsys)
    assert code == 0, err
    assert "mean over a single example averages one prompt's positions only" in " ".join(out.split())


def test_clean_accuracy_and_wrong_sign_fraction_are_recorded(world, tmp_path, capsys):
    """A third of the pairs with answer and wrong answer swapped: the model is wrong on them (its
    answer is always the first token) and their gap has the other sign: accuracy 2/3 and a
    wrong-sign fraction of 1/3 (warned: above 1/4). All swapped: accuracy 0 (warned)."""
    def swapped(p):
        return dict(p, answers=p["wrong_answers"], wrong_answers=p["answers"])

    mixed = [swapped(p) if i % 3 == 0 else p for i, p in enumerate(world["pairs"])]
    for name, records, accuracy, wrong_sign, warning in [
        ("good", world["pairs"], 1.0, 0.0, None),
        ("mixed", mixed, 2 / 3, 1 / 3, "33% of pairs have a clean-corrupt gap of the wrong sign"),
        ("swapped", [swapped(p) for p in world["pairs"]], 0.0, 0.0, "right on only 0% of 24 pairs"),
    ]:
        task = write_pairs(tmp_path / f"{name}.jsonl", records)
        config = write_config(tmp_path, config_text(world["model"], task, tmp_path / name), f"{name}.yaml")
        code, out, err = cli(["discover", config], capsys)
        assert code == 0, err
        record = json.loads((tmp_path / name / "circuit.json").read_text())["task_signal"]
        assert record["clean_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert record["wrong_sign_fraction"] == pytest.approx(wrong_sign, abs=1e-6)
        if warning is None:
            assert record["warnings"] == []
        else:
            assert any(warning in w for w in record["warnings"]), record["warnings"]
            assert warning in " ".join(out.split())


def test_judge_task_signal_thresholds():
    """The judgement alone, on hand-made numbers (per-example metric values)."""
    from circuitctl.checks import judge_task_signal, summarize
    from circuitctl.errors import UsageError

    def judge(full, empty, correct=None, identical=0, ablation="resample", allow=False):
        correct = correct if correct is not None else [True] * len(full)
        return judge_task_signal(summarize(full, empty, correct, identical, "logit_diff", ablation, "test"), allow)

    spread = [1.0, 3.0, 5.0, 7.0]  # standard deviation 2.58
    assert judge(spread, [v - 2 for v in spread]) == []
    with pytest.raises(UsageError, match="tiny next to its spread"):
        judge(spread, [v - 0.02 for v in spread])  # gap 0.02 < 1 % of 2.58
    assert judge(spread, [v - 0.02 for v in spread], allow=True)[0].startswith("running although")
    noisy = judge([1.0, 3.0, 5.0, 7.0], [0.0, 4.0, 3.0, 8.0])  # gap 0.25, standard error 0.63
    assert len(noisy) == 2 and "within 2 standard errors" in noisy[0] and "wrong sign" in noisy[1]
    with pytest.raises(UsageError, match="every corrupt prompt equals"):
        judge(spread, spread, identical=4)
    assert "1 of 4 pairs have a corrupt prompt equal" in judge(spread, [v - 2 for v in spread], identical=1)[0]
    assert "right on only 25%" in judge(spread, [v - 2 for v in spread], correct=[True, False, False, False])[0]
    with pytest.raises(UsageError, match="mean over a single example"):
        judge([5.0], [1.0], ablation="mean")


# ------------------------------------------------------------------------------------------
# 2. A full disk
# ------------------------------------------------------------------------------------------
CHECKPOINT_SCRIPT = r"""
import resource, sys, torch
from circuitctl.checkpoint import Checkpoint
from circuitctl.errors import UsageError
checkpoint = Checkpoint(sys.argv[1], "fingerprint")
checkpoint.save("acdc", {"step": 1}, {"x": torch.zeros(4)})
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    checkpoint.save("acdc", {"step": 2}, {"x": torch.zeros(100_000)})  # 400 kB of tensors: over the limit
except UsageError as exc:
    print("error:", exc)
state, tensors = checkpoint.load("acdc")
print("loaded", state["step"], tuple(tensors["x"].shape))
"""


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "file too large" in result.stdout and "tensors-2.safetensors" in result.stdout, result.stdout
    assert "loaded 1 (4,)" in result.stdout
    # nothing half-written is left: the previous state and its tensors only
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["state.json", "tensors-1.safetensors"]


def test_storage_errors_map_to_one_message():
    import errno

    from circuitctl.io.files import storage_error

    for code, text in [(errno.ENOSPC, "no space left"), (errno.EFBIG, "file too large"), (errno.EDQUOT, "no space left")]:
        error = storage_error(OSError(code, os.strerror(code)), "runs/x/circuit.json")
        assert error is not None and str(error).startswith(f"runs/x/circuit.json: {text}")
    assert storage_error(OSError(errno.EACCES, "Permission denied")) is None
    assert storage_error(ValueError("x")) is None


@pytest.mark.parametrize("into", ["the earlier run (--force)", pytest.param("a new directory", marks=pytest.mark.slow)])
def test_full_disk_while_writing_results(world, tmp_path, capsys, into):
    """A file-size limit below circuit.json's size (about 4 kB): exit 2 naming circuit.json and
    'file too large'; an earlier run is untouched, even when the failing run was allowed to
    replace it (--force, another config: config.yaml fits under the limit but is not replaced
    either: a run's files land together or not at all); no partial file is left, and a failed
    new run leaves no directory."""
    earlier = tmp_path / "earlier"
    assert cli(["discover", write_config(tmp_path, config_text(world["model"], world["task"], earlier), "a.yaml")], capsys)[0] == 0
    before = snapshot(earlier)
    target, force = (earlier, ["--force"]) if into.startswith("the earlier") else (tmp_path / "new", [])
    config = write_config(tmp_path, config_text(world["model"], world["task"], target, selection={"top_n": 1}), "b.yaml")
    result = cli_process(["discover", config, *force], limit_bytes=2048)
    one_error(result.returncode, result.stdout, result.stderr, f"{target / 'circuit.json'}: file too large")
    assert snapshot(earlier) == before
    assert sorted(p.name for p in earlier.iterdir()) == sorted(before)  # no temporary file, no lock left
    assert not (tmp_path / "new").exists()


def _mounted_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_no_space_left_on_a_small_tmpfs(world, tmp_path, capsys):
    """A real full file system (a 64 kB tmpfs, when this process may mount one): exit 2 with
    'no space left' and the path; the earlier run on it is unchanged."""
    disk = tmp_path / "disk"
    if not _mounted_tmpfs(disk, "64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        earlier = disk / "earlier"
        assert cli(["discover", write_config(tmp_path, config_text(world["model"], world["task"], earlier), "a.yaml")], capsys)[0] == 0
        before = snapshot(earlier)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 8192))  # two pages left: config.yaml fits, circuit.json does not
        config = write_config(tmp_path, config_text(world["model"], world["task"], disk / "new"), "b.yaml")
        result = cli_process(["discover", config])
        one_error(result.returncode, result.stdout, result.stderr, "no space left on the device", str(disk / "new"))
        assert snapshot(earlier) == before
        assert not (disk / "new").exists()  # nothing half-written: the failed run's directory is gone
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.slow
def test_full_disk_after_the_method_keeps_its_checkpoint_for_resume(world, tmp_path):
    """ACDC checkpoints as it goes; the write of circuit.json fails on a file-size limit; the
    checkpoint is intact and --resume (with space) ends with the uninterrupted run's circuit."""
    method = {"name": "acdc", "tau": 0.5, "checkpoint_every_seconds": 0.0}
    reference = tmp_path / "reference"
    assert cli_process(["discover", write_config(tmp_path, config_text(world["model"], world["task"], reference, method), "r.yaml")]).returncode == 0
    run = tmp_path / "run"
    config = write_config(tmp_path, config_text(world["model"], world["task"], run, method))
    result = cli_process(["discover", config], limit_bytes=3000)
    one_error(result.returncode, result.stdout, result.stderr, "file too large")
    assert (run / "checkpoint" / "state.json").is_file()
    result = cli_process(["discover", config, "--resume", run])
    assert result.returncode == 0, result.stderr
    edges = lambda d: json.loads((d / "circuit.json").read_text())["edges"]  # noqa: E731
    assert edges(run) == edges(reference)


# ------------------------------------------------------------------------------------------
# 3. Two runs into one directory
# ------------------------------------------------------------------------------------------
HOLDER_SCRIPT = r"""
import sys, time
from circuitctl.io.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_into_a_locked_directory_fails_fast(world, tmp_path, capsys):
    """Another process holds the run directory: discover (and --resume) fail at once naming its pid."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = write_config(tmp_path, config_text(world["model"], world["task"], run))
        started = time.monotonic()
        code, out, err = cli(["discover", config], capsys)
        one_error(code, out, err, f"output.dir '{run}' is in use by another circuitctl process (pid {holder.pid}", "-c")
        code, out, err = cli(["discover", config, "--resume", run], capsys)
        one_error(code, out, err, f"--resume '{run}' is in use by another circuitctl process (pid {holder.pid}")
        assert time.monotonic() - started < 30
        assert [p.name for p in run.iterdir()] == [".circuitctl.lock"]  # nothing of ours was written
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock file is stale and is taken over
    assert (run / ".circuitctl.lock").exists()
    code, out, err = cli(["discover", config], capsys)
    assert code == 0, err
    assert not (run / ".circuitctl.lock").exists() and (run / "circuit.json").is_file()


def test_lock_in_one_process():
    """flock locks belong to an open file: a second lock of the same directory fails even here."""
    import tempfile

    from circuitctl.errors import UsageError
    from circuitctl.io.run_lock import RunLock

    with tempfile.TemporaryDirectory() as directory:
        with RunLock(Path(directory) / "run") as lock:
            record = json.loads(lock.path.read_text())
            assert record["pid"] == os.getpid()
            with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
                RunLock(Path(directory) / "run").acquire()
        assert not lock.path.exists()
        with RunLock(Path(directory) / "run"):  # released: free again
            pass


def _wait_for_lock(run: Path, process: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads((run / ".circuitctl.lock").read_text())
            if record.get("pid") == process.pid:
                return record
        except (OSError, ValueError):
            pass
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    raise AssertionError("the first run never took the lock")


@pytest.mark.slow
def test_two_discover_processes_into_one_directory(world, tmp_path):
    """Two real `discover` processes, same output.dir: the second fails naming the first (held
    still with SIGSTOP so the order is certain); the first then finishes a whole run. A run
    killed part-way leaves a stale lock that the next run takes over. The same for --resume."""
    run = tmp_path / "run"
    config = write_config(tmp_path, config_text(world["model"], world["task"], run))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "circuitctl", "discover", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lock(run, first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = cli_process(["discover", config])
    finally:
        os.kill(first.pid, signal.SIGCONT)
    one_error(second.returncode, second.stdout, second.stderr, f"pid {first.pid}", f"discover {config}")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert json.loads((run / "circuit.json").read_text())["task_signal"]["clean_accuracy"] == 1.0

    stale = tmp_path / "stale"
    killed = subprocess.Popen([sys.executable, "-m", "circuitctl", "discover", str(config), f"output.dir={stale}"], env=env)
    _wait_for_lock(stale, killed)
    killed.kill()
    killed.wait()
    assert [p.name for p in stale.iterdir()] == [".circuitctl.lock"]
    result = cli_process(["discover", config, f"output.dir={stale}"])  # no --force needed: only the stale lock is there
    assert result.returncode == 0, result.stderr

    # --resume of one run twice
    method = {"name": "acdc", "tau": 0.5, "checkpoint_every_seconds": 0.0}
    resumable = tmp_path / "resumable"
    acdc = write_config(tmp_path, config_text(world["model"], world["task"], resumable, method), "acdc.yaml")
    one_error(*_fields(cli_process(["discover", acdc], limit_bytes=3000)), "file too large")  # leaves a checkpoint
    first = subprocess.Popen([sys.executable, "-m", "circuitctl", "discover", str(acdc), "--resume", str(resumable)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lock(resumable, first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = cli_process(["discover", acdc, "--resume", resumable])
    finally:
        os.kill(first.pid, signal.SIGCONT)
    one_error(*_fields(second), f"--resume '{resumable}' is in use", f"pid {first.pid}")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err


def _fields(result: subprocess.CompletedProcess) -> tuple[int, str, str]:
    return result.returncode, result.stdout, result.stderr


# ------------------------------------------------------------------------------------------
# 4. Corrupt checkpoints
# ------------------------------------------------------------------------------------------
@pytest.fixture
def interrupted_acdc(world, tmp_path, capsys, monkeypatch) -> tuple[Path, Path, Path]:
    """(config, run directory with an ACDC checkpoint, the finished run of the same config)."""
    import circuitctl.runner as runner

    method = {"name": "acdc", "tau": 0.5, "checkpoint_every_seconds": 0.0}
    reference = tmp_path / "reference"
    assert cli(["discover", write_config(tmp_path, config_text(world["model"], world["task"], reference, method), "r.yaml")], capsys)[0] == 0
    run = tmp_path / "run"
    config = write_config(tmp_path, config_text(world["model"], world["task"], run, method))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C once the method is done: its checkpoints stay

    with monkeypatch.context() as patch:
        patch.setattr(runner, "finish", stop)
        assert cli(["discover", config], capsys)[0] == 130
    assert (run / "checkpoint" / "state.json").is_file()
    return config, run, reference


def _flip_bit(path: Path, position: int, bit: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def _state_digit(path: Path) -> int:
    """The position of a digit (0, 1, 4 or 5: still a digit with bit 1 flipped) inside the state."""
    text = path.read_text()
    start = text.index('"state"')
    return next(i for i in range(start, len(text)) if text[i] in "0145")


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncate-state", "unreadable checkpoint"),
        ("flip-state", "corrupt checkpoint (its checksum does not match its contents"),
        ("truncate-tensors", "corrupt checkpoint tensors"),
        ("flip-tensors", "corrupt checkpoint tensors"),
    ],
)
def test_corrupt_checkpoint_is_refused_and_left_as_it_is(interrupted_acdc, damage, expected, capsys):
    config, run, reference = interrupted_acdc
    state = run / "checkpoint" / "state.json"
    tensors = run / "checkpoint" / json.loads(state.read_text())["tensor_file"]
    intact = snapshot(run / "checkpoint")
    target = state if damage.endswith("state") else tensors
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        _flip_bit(target, _state_digit(state) if target == state else target.stat().st_size - 1)
    damaged = snapshot(run / "checkpoint")
    code, out, err = cli(["discover", config, "--resume", run], capsys)
    one_error(code, out, err, f"{target}: {expected}", "left as it is")
    assert snapshot(run / "checkpoint") == damaged  # never replaced by a fresh start
    assert not (run / "circuit.json").exists()
    # the intact checkpoint resumes to the uninterrupted run's circuit
    for name, content in intact.items():
        (run / "checkpoint" / name).write_bytes(content)
    code, out, err = cli(["discover", config, "--resume", run], capsys)
    assert code == 0, err
    assert json.loads((run / "circuit.json").read_text())["edges"] == json.loads((reference / "circuit.json").read_text())["edges"]


# ------------------------------------------------------------------------------------------
# 5. Hostile names
# ------------------------------------------------------------------------------------------
HOSTILE = 'evil"</title><script>alert(1)</script>&nbsp;&amp;\\N\\\n名前 -- \x1b[31m'
HOSTILE_LABELS = ['S"1', "<script>alert(1)</script>", "a\nb", "x@y", "a->b", "end ", "", "a<q>", "&amp;", "lab;el", "\x00"]


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=[ascii(label) for label in HOSTILE_LABELS])
def test_hostile_position_label_is_refused_at_validation(world, tmp_path, label, capsys):
    record = dict(world["pairs"][0], positions={label: 1})
    task = write_pairs(tmp_path / "pairs.jsonl", [record])
    code, out, err = cli(["validate", write_config(tmp_path, config_text(world["model"], task))], capsys)
    one_error(code, out, err, "pairs.jsonl line 1", "position label", "is not allowed")
    assert f"position label {label!r}" in err


def check_output_files(directory: Path) -> list[str]:
    """Parse every file a run wrote: JSON strictly, DOT with Graphviz, SVG as XML with no script,
    HTML with the names only inside its escaped JSON data, markdown with no raw markup."""
    checked = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8") if path.suffix != ".png" else ""
        if path.suffix == ".json":
            json.loads(text, parse_constant=lambda c: pytest.fail(f"{path}: {c} is not JSON"))
        elif path.suffix == ".yaml":
            yaml.safe_load(text)
        elif path.suffix == ".dot":
            result = subprocess.run(["dot", "-Tsvg"], input=text.encode(), capture_output=True, timeout=60)
            assert result.returncode == 0, (path, result.stderr)
            ET.fromstring(result.stdout)
        elif path.suffix == ".svg":
            root = ET.fromstring(text)
            for element in root.iter():
                assert not element.tag.lower().endswith("script"), path
                assert not any(k.lower().startswith("on") for k in element.attrib), path
        elif path.suffix == ".html":  # a page of the run: names only inside escaped data, never as markup
            assert "<script>alert(1)" not in text and "</title><script>" not in text, path
            for data in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', text, re.S):
                json.loads(data)
        elif path.suffix == ".md":  # explain's report: names as inert markdown text
            assert "<script>" not in text and "<b>" not in text and "\x1b" not in text, path
        elif path.suffix not in (".png",):
            pytest.fail(f"unexpected output file {path}")
        checked.append(path.name)
    return checked


@pytest.fixture(scope="module")
def hostile_world(world, tmp_path_factory) -> dict:
    """A model, a task and an output directory whose names (and the task's) are hostile; position
    labels that are allowed but not ASCII."""
    root = tmp_path_factory.mktemp("hostile") / 'dir <script>"q"&amp; ü\nx'
    model = root / "model <b>bold</b>"
    shutil.copytree(world["model"], model)
    task = root / "task \"'<>&"
    task.mkdir(parents=True)
    (task / "task.yaml").write_text(yaml.safe_dump({"name": HOSTILE, "pairs": "pairs <x>.jsonl"}, allow_unicode=True), encoding="utf-8")
    labelled = [dict(p, positions={"Süd": 0, "主": 3, "end": -1}) for p in world["pairs"]]
    write_pairs(task / "pairs <x>.jsonl", labelled)
    return {"root": root, "model": model, "task": task}


HOSTILE_RUNS = {
    "edges": "eap",
    "per_position_edges": {"name": "eap_ig", "steps": 2, "positions": "per_token"},
    "per_position_nodes": {"name": "eap_ig", "steps": 2, "positions": "per_token", "granularity": "node"},
    "path_patching": {"name": "path_patching", "threshold": 0.1},
}


@pytest.mark.parametrize("kind", list(HOSTILE_RUNS))
def test_hostile_names_stay_inert_in_every_output(hostile_world, kind, capsys):
    run = hostile_world["root"] / f"run {kind} <script>"
    config = write_config(hostile_world["root"], config_text(hostile_world["model"], hostile_world["task"], run, HOSTILE_RUNS[kind]), f"{kind}.yaml")
    code, out, err = cli(["discover", config, "--force"], capsys)
    assert code == 0, err
    code, out, err = cli(["evaluate", "faithfulness", run, "--force"], capsys)
    assert code == 0, err
    checked = check_output_files(run)
    assert {"circuit.json", "circuit.dot", "circuit.svg", "faithfulness.json"} <= set(checked)
    record = json.loads((run / "circuit.json").read_text())
    assert record["task"]["name"] == HOSTILE  # JSON keeps the name exactly
    if kind.startswith("per_position"):
        positions = (record.get("space") or record)["positions"]  # schema 2 keeps them in the space
        assert {"Süd", "主", "end"} <= set(positions["names"])
        assert "@Süd" in (run / "circuit.dot").read_text(encoding="utf-8")
    svg = (run / "circuit.svg").read_text(encoding="utf-8")
    assert "<script" not in svg and "alert(1)" in svg  # the title is drawn as text


def test_hostile_plugin_name_and_default_run_directory(hostile_world, tmp_path, capsys, monkeypatch):
    """A plugin method whose name is hostile, and no output.dir: the default run directory is
    one directory under runs/ (no '/', no '..'), and every output parses."""
    from circuitctl.config.methods import METHODS, MethodInfo, MethodSettings

    class HostileSettings(MethodSettings):
        name: str = "../" + HOSTILE

    name = "../" + HOSTILE
    METHODS.names()  # load the real plugins first
    monkeypatch.setitem(METHODS._entries, name, MethodInfo(name, HostileSettings, "circuitctl.methods.eap:discover", "EAP under a hostile name"))
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, config_text(hostile_world["model"], hostile_world["task"], None, name))
    code, out, err = cli(["discover", config], capsys)
    assert code == 0, err
    (run,) = list((tmp_path / "runs").iterdir())
    assert run.parent == tmp_path / "runs" and "/" not in run.name and not run.name.startswith(".")
    check_output_files(run)
    assert json.loads((run / "circuit.json").read_text())["method"]["name"] == name


def test_escaping_functions():
    from markdown_it import MarkdownIt

    from circuitctl.io.escape import dot_string, html_text, markdown_text, path_component

    for text in [HOSTILE, "a | b\n# heading\n- item", "[link](javascript:alert(1))", "`code` *em* _u_ <b>", "\udc80 lone", "😀 ok"]:
        html = MarkdownIt("commonmark").render(markdown_text(text))
        assert "<script" not in html and "<a " not in html and "<b>" not in html and "<h1" not in html, html
        assert "<em>" not in html and "<code>" not in html, html
        root = ET.fromstring(f"<div>{html}</div>")
        rendered = "".join(root.itertext()).strip()
        expected = "".join(ch if ch.isprintable() or ch in "\n\t\r" else ascii(ch)[1:-1] for ch in text)
        assert rendered == " ".join(expected.replace("\r", " ").replace("\t", " ").split("\n")).strip(), (text, html)
        assert ET.fromstring(f"<p title=\"{html_text(text)}\">{html_text(text)}</p>").text is not None
        dot = f"digraph {{ label={dot_string(text)}; {dot_string(text)} -> b; }}"
        result = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        ET.fromstring(result.stdout)
    assert path_component("../../etc/passwd") == "_.._etc_passwd"
    assert path_component("...") == "run" and path_component("Süd-1.x") == "Süd-1.x"


# ------------------------------------------------------------------------------------------
# 6. Huge task files
# ------------------------------------------------------------------------------------------
N_HUGE = 100_000
NO_SHIPPED_TASKS = Path("/nonexistent-shipped-tasks")  # tasks here are files, or a generator (ioi)


@pytest.fixture(scope="module")
def huge_task(tmp_path_factory) -> Path:
    """100,000 pairs of token ids (7 MB); line 99,999 holds an error in a copy."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("huge") / "pairs.jsonl"
    with open(path, "w") as handle:
        for _ in range(N_HUGE):
            clean = [rng.randrange(12) for _ in range(6)]
            corrupt = [(clean[0] + 1) % 12] + clean[1:]
            handle.write(json.dumps({"clean": clean, "corrupt": corrupt, "answers": [clean[0]], "wrong_answers": [corrupt[0]]}) + "\n")
    return path


def test_error_on_line_99999_names_it(world, huge_task, tmp_path, capsys):
    lines = huge_task.read_text().splitlines()
    lines[99_998] = lines[99_998].replace('"answers"', '"answer"')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    code, out, err = cli(["validate", write_config(tmp_path, config_text(world["model"], bad))], capsys)
    one_error(code, out, err, "bad.jsonl line 99999", "unknown field(s) answer")


@pytest.mark.parametrize("n", [10_000, pytest.param(N_HUGE, marks=pytest.mark.slow)])
def test_task_file_streams_with_bounded_memory(huge_task, n, tmp_path):
    """Validating n pairs keeps 16 bytes a pair (offsets and line numbers), never the file or its
    pairs; tokenizing them keeps one chunk of pairs as Python objects and the ids in int64 tensors
    (8 bytes an id). Python allocations measured with tracemalloc (10x slower: the 100,000-pair case
    is marked slow); torch's tensors are not Python allocations (bench/bench_task_files.py measures
    the whole process)."""
    from circuitctl.tasks.data import tokenize_pairs
    from circuitctl.tasks.records import read_task

    path = tmp_path / "pairs.jsonl"
    with open(huge_task) as source, open(path, "w") as target:
        target.writelines(line for _, line in zip(range(n), source))
    size = path.stat().st_size
    small = tmp_path / "small.jsonl"
    small.write_text(path.read_text().split("\n", 1)[0] + "\n")
    tokenize_pairs(read_task(None, small, NO_SHIPPED_TASKS).pairs, None, 12, None, "warm-up")  # imports are not the data's
    tracemalloc.start()
    try:
        pairs = read_task(None, path, NO_SHIPPED_TASKS).pairs
        _, validation_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        data = tokenize_pairs(pairs, None, 12, None, str(path))
        _, tokenize_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(pairs) == n and data.n == n
    # the file is 70 bytes a pair, its pairs as Python objects about 1 kB a pair
    assert validation_peak < 300_000 + 20 * n < size, validation_peak
    assert tokenize_peak < 3_000_000 + 16 * n, tokenize_peak  # one chunk of 1,024 pairs + the lengths
    first = json.loads(path.read_text().split("\n", 1)[0])
    assert data.clean[0].tolist() == first["clean"] and data.wrong[0].tolist() == first["wrong_answers"]


def test_subsample_reads_only_its_pairs_and_matches_the_old_sample(huge_task, monkeypatch):
    """`n_pairs` parses only the chosen lines (after the one validation pass) and picks the same
    pairs as before streaming: random.Random(seed).sample(all pairs, n)."""
    import random

    import circuitctl.tasks.pair_file as pair_file
    from circuitctl.tasks.data import task_pairs
    from circuitctl.tasks.records import pair_from_record, read_task

    source = read_task(None, huge_task, NO_SHIPPED_TASKS)
    parsed = []
    original = pair_file._pair
    monkeypatch.setattr(pair_file, "_pair", lambda raw, path, number, make: parsed.append(number) or original(raw, path, number, make))
    chosen = task_pairs(source, None, 100, seed=7, options={})
    assert len(parsed) == 100 and sorted(parsed) == sorted(p.line for p in chosen)
    lines = huge_task.read_text().splitlines()
    old = random.Random(7).sample([pair_from_record(json.loads(t), "x", i + 1) for i, t in enumerate(lines[:2000])], 10)
    monkeypatch.undo()
    small = huge_task.parent / "small.jsonl"
    small.write_text("\n".join(lines[:2000]) + "\n")
    new = task_pairs(read_task(None, small, NO_SHIPPED_TASKS), None, 10, seed=7, options={})
    assert [p.line for p in new] == [p.line for p in old] and [p.clean for p in new] == [p.clean for p in old]


def test_streaming_tokenization_equals_the_plain_one(gpt2_tokenizer_or_skip):
    """The chunked, batched tokenizer gives the ids of one `encode` call per prompt (shipped tasks)."""
    import torch

    from circuitctl.tasks.data import task_pairs, tokenize_pairs
    from circuitctl.tasks.records import read_task

    tokenizer = gpt2_tokenizer_or_skip
    pairs = task_pairs(read_task("ioi", None, NO_SHIPPED_TASKS), tokenizer, 40, seed=0, options={})
    data = tokenize_pairs(pairs, tokenizer, 50257, 50256, "ioi")
    for i, pair in enumerate(pairs):
        ids = [50256] + tokenizer.encode(pair.clean, add_special_tokens=False)
        assert data.clean[i, : len(ids)].tolist() == ids and int(data.lengths[i]) == len(ids)
        assert data.answers[i, 0].item() == tokenizer.encode(pair.answers[0], add_special_tokens=False)[0]
        for label, index in pair.positions.items():
            assert int(data.positions[label][i]) == index + 1
    assert data.clean.dtype == torch.long


@pytest.fixture
def gpt2_tokenizer_or_skip():
    try:
        from circuitctl.tasks.gpt2_tokenizer import load_offline_gpt2_tokenizer

        return load_offline_gpt2_tokenizer()
    except Exception as exc:  # the offline vocabulary package is a dev extra
        pytest.skip(f"offline GPT-2 tokenizer unavailable: {exc}")


def test_validation_shows_a_progress_bar(huge_task, monkeypatch):
    import io

    from rich.console import Console

    import circuitctl.progress as progress
    from circuitctl.tasks.records import read_task

    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=True, width=100))
    read_task(None, huge_task, NO_SHIPPED_TASKS)
    assert "checking pairs.jsonl" in screen.getvalue()
