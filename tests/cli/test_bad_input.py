"""A corpus of bad inputs, each run through the real CLI.

Every case must end with ONE message that names the problem (and the field or line), exit
code 2 (1 only for internal errors), no traceback, and an earlier run directory left byte for
byte as it was. Cases that fail before any model is loaded run in a subprocess
(``python -m circuitctl``), exactly as a user runs them; cases that need a loaded model run
in-process through the same entry point (`circuitctl.cli.app.main`), which saves importing
TransformerLens once per case. Most in-process cases pass ``--force`` with the earlier run as
output directory: a failing run must not touch it even when allowed to replace it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

MESSAGE = re.compile(r"^(error|Error|internal error):", re.MULTILINE)  # ours, and click's usage errors
GOOD_PAIR = {"clean": [2, 1, 5, 11, 4, 7], "corrupt": [9, 1, 5, 11, 4, 7], "answers": [2], "wrong_answers": [9]}


# ------------------------------------------------------------------------------------------
# The world every case starts from: tiny checkpoints, a task, and an earlier finished run.
# ------------------------------------------------------------------------------------------
@dataclass
class World:
    root: Path
    model: Path
    task: Path
    tok_model: Path  # the same model with a word-level tokenizer ("w0".."w10", "<unk>")
    variants: dict[str, Path]  # broken copies of `model`
    prior: Path  # a finished run: circuit files + faithfulness.json
    other_circuit: Path  # a circuit of a 2-layer model
    foreign_mib: Path  # a MIB circuit with edges this model does not have


def _variant(world_root: Path, model: Path, name: str, state_dict=None, config_update=None, weights_text=None) -> Path:
    from safetensors.torch import save_file

    path = world_root / f"model_{name}"
    shutil.copytree(model, path)
    if state_dict is not None:
        save_file(state_dict, str(path / "model.safetensors"))
    if weights_text is not None:
        (path / "model.safetensors").write_text(weights_text)
    if config_update is not None:
        config = json.loads((path / "config.json").read_text())
        config.update(config_update)
        (path / "config.json").write_text(json.dumps(config))
    return path


def _add_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(11)} | {"<unk>": 11}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "special_tokens.json").write_text(json.dumps({"unk_token": "<unk>"}))


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    import torch
    from safetensors.torch import load_file

    from circuitctl.config.load import load_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.graph.graph import Graph, GraphSpec
    from circuitctl.circuits.edges import EdgeSpace
    from circuitctl.circuits.record import circuit_record, write_circuit_file
    from circuitctl.testing import planted
    from circuitctl.runner import discover

    root = tmp_path_factory.mktemp("bad_input")
    model, task = planted.export(planted.build("copy_first"), root / "model", root / "task")
    weights = load_file(str(model / "model.safetensors"))

    nan = dict(weights)
    nan["blocks.0.attn.W_V"] = weights["blocks.0.attn.W_V"].clone()
    nan["blocks.0.attn.W_V"][0, 0, 0] = float("nan")
    # finite weights whose logits overflow float32: the NaN appears inside the model
    overflow = dict(weights, **{"embed.W_E": weights["embed.W_E"] * 1e20, "unembed.W_U": weights["unembed.W_U"] * 1e20})
    # fine in float32, but the logits exceed float16's range (65504)
    fp16_overflow = dict(weights, **{"embed.W_E": weights["embed.W_E"] * 300, "unembed.W_U": weights["unembed.W_U"] * 300})
    missing = {k: v for k, v in weights.items() if k != "blocks.0.attn.W_V"}
    variants = {
        "nan_weight": _variant(root, model, "nan_weight", state_dict=nan),
        "overflow": _variant(root, model, "overflow", state_dict=overflow),
        "fp16_overflow": _variant(root, model, "fp16_overflow", state_dict=fp16_overflow),
        "missing_tensor": _variant(root, model, "missing_tensor", state_dict=missing),
        "extra_tensor": _variant(root, model, "extra_tensor", state_dict=dict(weights, stray=torch.zeros(2))),
        "shape": _variant(root, model, "shape", config_update={"d_model": 16}),
        "bad_field": _variant(root, model, "bad_field", config_update={"n_layers": "two"}),
        "unknown_field": _variant(root, model, "unknown_field", config_update={"n_layer": 1}),
        "garbage": _variant(root, model, "garbage", weights_text="not a safetensors file"),
    }
    for name, missing_file in (("no_weights", "model.safetensors"), ("no_config", "config.json")):
        variants[name] = _variant(root, model, name)
        (variants[name] / missing_file).unlink()
    tok_model = _variant(root, model, "tok")
    _add_tokenizer(tok_model)

    prior = root / "prior"
    (root / "prior.yaml").write_text(_config(model, task, output=prior))
    discover(load_config(root / "prior.yaml"), root)
    evaluate_faithfulness(prior, load_config(prior / "config.yaml"), prior, prior)

    other = Graph(GraphSpec(n_layers=2, n_heads=3, has_mlps=False))
    other_circuit = root / "other" / "circuit.json"
    other_circuit.parent.mkdir()
    empty = torch.zeros(other.n_upstream, other.n_downstream)
    space = EdgeSpace(other)
    write_circuit_file(other_circuit, circuit_record({}, other.spec.to_dict(), space.info(), space.entries(empty, empty.bool())))
    foreign_mib = root / "foreign.mib.json"
    foreign_mib.write_text(
        json.dumps({"cfg": {"n_layers": 1, "n_heads": 3}, "nodes": {}, "edges": {"a3.h0->logits": {"score": 1.0, "in_graph": True}}})
    )
    return World(root, model, task, tok_model, variants, prior, other_circuit, foreign_mib)


def _config(model, task, output=None, method="eap", extra: str = "") -> str:
    """A run config; paths are JSON-quoted (valid YAML)."""
    lines = [
        f"model: {{path: {json.dumps(str(model))}, device: cpu}}",
        f"task: {{path: {json.dumps(str(task))}}}",
        f"method: {{name: {method}}}",
    ]
    if output is not None:
        lines.append(f"output: {{dir: {json.dumps(str(output))}}}")
    return "\n".join(lines) + "\n" + extra


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# Cases. `build(world, case_dir)` writes the case's files and returns the CLI arguments.
# ------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    build: Callable[[World, Path], list[str]]
    expect: tuple[str, ...]  # substrings of the one error message
    heavy: bool = False  # needs a loaded model: run in-process
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()  # paths (relative to the case dir) that must not exist afterwards


def cfg_file(d: Path, text: str, name: str = "run.yaml") -> str:
    (d / name).write_text(text)
    return str(d / name)


def validate(text_of: Callable[[World, Path], str], *extra: str) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["validate", cfg_file(d, text_of(w, d)), *extra]


def discover(text_of: Callable[[World, Path], str], *extra: str, force: bool = True) -> Callable[[World, Path], list[str]]:
    return lambda w, d: ["discover", cfg_file(d, text_of(w, d)), *extra] + (["--force"] if force else [])


def good(w: World, d: Path, extra: str = "", **kw) -> str:
    return _config(kw.get("model", w.model), kw.get("task", w.task), kw.get("output"), kw.get("method", "eap"), extra)


def pairs_file(d: Path, *records) -> Path:
    """A JSONL task file; a str record is written as is (to make malformed lines)."""
    path = d / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def with_pairs(*records, model_of=lambda w: w.model) -> Callable[[World, Path], str]:
    """A config whose task is these pairs; output into the earlier run (with --force)."""
    return lambda w, d: _config(model_of(w), pairs_file(d, *records), output=w.prior)


def spec_task(spec_text: str, *records) -> Callable[[World, Path], str]:
    def text(w: World, d: Path) -> str:
        (d / "task").mkdir()
        (d / "task" / "task.yaml").write_text(spec_text)
        if records:
            (d / "task" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return _config(w.model, d / "task")

    return text


def on_prior(model_key: str) -> Callable[[World, Path], str]:
    return lambda w, d: _config(w.variants[model_key], w.task, output=w.prior)


def pair(**changes) -> dict:
    record = dict(GOOD_PAIR, **changes)
    return {k: v for k, v in record.items() if v is not None}


def read_only_output(w: World, d: Path) -> list[str]:
    """A read-only run directory holding an earlier run (chmod; as root, a path under /sys)."""
    target = d / "ro_run"
    shutil.copytree(w.prior, target)
    target.chmod(0o555)
    try:
        (target / ".probe").write_text("")
    except OSError:
        return ["discover", cfg_file(d, _config(w.model, w.task, output=target)), "--force"]
    (target / ".probe").unlink()  # running as root: permissions do not stop writes
    target.chmod(0o755)
    blocked = Path("/sys/circuitctl-read-only-probe")
    try:
        blocked.mkdir()
    except OSError:
        return ["discover", cfg_file(d, _config(w.model, w.task, output=blocked / "run"))]
    blocked.rmdir()
    pytest.skip("running as root and no read-only location found to write into")


def other_model_circuit(w: World, d: Path) -> list[str]:
    return ["evaluate", "faithfulness", str(w.other_circuit), "--config", str(w.prior / "config.yaml"), "--out", str(w.prior), "--force"]


def foreign_mib_circuit(w: World, d: Path) -> list[str]:
    return ["evaluate", "faithfulness", str(w.foreign_mib), "--config", str(w.prior / "config.yaml"), "--out", str(w.prior), "--force"]


def not_json_circuit(w: World, d: Path) -> list[str]:
    (d / "circuit.json").write_text('{"edges": {"input->logits": ')
    return ["evaluate", "faithfulness", str(d / "circuit.json"), "--config", str(w.prior / "config.yaml"), "--out", str(w.prior), "--force"]


CASES = [
    # -- the config file itself --------------------------------------------------------
    Case("malformed-yaml", validate(lambda w, d: "model: {path: m\ntask: x\n"), ("malformed YAML", "line 2")),
    Case("bad-indentation", validate(lambda w, d: "model:\n  path: m\n device: cpu\n"), ("malformed YAML", "line 3")),
    Case("python-object-tag", validate(lambda w, d: f"!!python/object/apply:os.mkdir [{json.dumps(str(d / 'pwned'))}]\n"),
         ("!!python/object/apply:os.mkdir", "not allowed"), absent=("pwned",)),
    Case("python-name-tag", validate(lambda w, d: "model: !!python/name:os.system\ntask: {path: t}\n"), ("!!python/name:os.system", "line 1")),
    Case("empty-config", validate(lambda w, d: ""), ("empty",)),
    Case("config-is-a-list", validate(lambda w, d: "- model\n- task\n"), ("must be a YAML mapping",)),
    Case("config-missing", lambda w, d: ["validate", str(d / "nope.yaml")], ("nope.yaml", "does not exist")),
    Case("config-is-a-directory", lambda w, d: ["validate", str(d)], ("is a directory",)),
    Case("unknown-top-level-key", validate(lambda w, d: good(w, d) + "modle: {}\n"), ("modle (line 4)", "did you mean 'model'")),
    Case("unknown-nested-key", validate(lambda w, d: good(w, d).replace("device", "devise")), ("model.devise (line 1)", "did you mean 'device'")),
    Case("unknown-method-setting", validate(lambda w, d: good(w, d).replace("{name: eap}", "{name: eap, batchsize: 4}")),
         ("method.batchsize (line 3)", "did you mean 'batch_size'")),
    Case("wrong-type-int", validate(lambda w, d: good(w, d).replace("{name: eap}", "{name: eap, batch_size: many}")),
         ("method.batch_size (line 3)", "integer")),
    Case("wrong-type-seed", validate(lambda w, d: good(w, d) + "seed: [1, 2]\n"), ("seed (line 4)", "integer")),
    Case("all-problems-at-once", validate(lambda w, d: good(w, d).replace("{name: eap}", "{name: eap, batch_size: 0}") + "seed: x\n"),
         ("2 problems", "method.batch_size (line 3)", "seed (line 4)")),
    Case("method-missing", validate(lambda w, d: good(w, d).replace("method: {name: eap}\n", "")), ("method", "required")),
    Case("unknown-method", validate(lambda w, d: good(w, d, method="eapp")), ("method.name (line 3)", "unknown method 'eapp'", "did you mean 'eap'")),
    Case("unknown-metric", validate(lambda w, d: good(w, d) + "metric: logit_dif\n"), ("metric (line 4)", "did you mean 'logit_diff'")),
    Case("unknown-ablation", validate(lambda w, d: good(w, d) + "ablation: resampel\n"), ("ablation.type", "did you mean 'resample'")),
    Case("unknown-task-name", validate(lambda w, d: good(w, d).replace(f"path: {json.dumps(str(w.task))}", "name: ioj")),
         ("task.name", "unknown task 'ioj'", "did you mean 'ioi'")),
    Case("two-model-sources", validate(lambda w, d: good(w, d).replace("device: cpu", "name: gpt2")), ("model (line 1)", "exactly one")),
    Case("bad-device", validate(lambda w, d: good(w, d).replace("device: cpu", "device: gpu")), ("model.device (line 1)", "'gpu' is not a device")),
    Case("threshold-negative", validate(lambda w, d: good(w, d) + "selection: {threshold: -0.5}\n"), ("selection.threshold (line 4)", "greater than or equal to 0")),
    Case("threshold-wrong-type", validate(lambda w, d: good(w, d) + "selection: {threshold: high}\n"), ("selection.threshold (line 4)", "number")),
    Case("top-n-and-threshold", validate(lambda w, d: good(w, d) + "selection: {threshold: 0.1, top_n: 5}\n"), ("selection (line 4)", "at most one")),
    Case("fraction-above-one", validate(lambda w, d: good(w, d) + "selection: {fraction: 1.5}\n"), ("selection.fraction", "less than or equal to 1")),
    Case("override-not-key-value", validate(lambda w, d: good(w, d), "method.name"), ("override 'method.name'", "key=value")),
    Case("override-unknown-key", validate(lambda w, d: good(w, d), "method.nme=eap"), ("method.nme", "did you mean 'name'")),
    # -- the model ---------------------------------------------------------------------
    Case("model-dir-missing", validate(lambda w, d: good(w, d, model=d / "nowhere")), ("model.path", "does not exist")),
    Case("model-dir-without-weights", validate(lambda w, d: good(w, d, model=w.variants["no_weights"])), ("has no model.safetensors",)),
    Case("model-dir-without-config", validate(lambda w, d: good(w, d, model=w.variants["no_config"])), ("has no config.json",)),
    Case("pretrained-not-cached-offline",  # discover stops; validate only notes it (tests/test_config.py)
         discover(lambda w, d: good(w, d).replace(f"path: {json.dumps(str(w.model))}", "name: gpt2-small"), force=False),
         ("model.name", "'gpt2-small' (gpt2)", "HF_HUB_OFFLINE"), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "{case}/hf-cache"}),
    Case("pretrained-unknown-name", validate(lambda w, d: good(w, d).replace(f"path: {json.dumps(str(w.model))}", "name: gtp2")),
         ("model.name", "'gtp2' is not a pretrained model", "did you mean 'gpt2'")),
    Case("state-dict-missing-tensor", discover(on_prior("missing_tensor")), ("missing 1 tensors", "blocks.0.attn.W_V"), heavy=True),
    Case("state-dict-extra-tensor", discover(on_prior("extra_tensor")), ("unexpected", "stray"), heavy=True),
    Case("state-dict-shape-mismatch", discover(on_prior("shape")), ("model.safetensors", "has shape", "does not match config.json"), heavy=True),
    Case("weights-not-safetensors", discover(on_prior("garbage")), ("cannot be read as safetensors",), heavy=True),
    Case("config-json-wrong-type", discover(on_prior("bad_field")), ("config.json", "cannot build a model"), heavy=True),
    Case("config-json-unknown-field", discover(on_prior("unknown_field")), ("config.json", "n_layer"), heavy=True),
    Case("nan-weight", discover(on_prior("nan_weight")), ("blocks.0.attn.W_V", "NaN"), heavy=True),
    Case("nan-inside-model", discover(on_prior("overflow")), ("NaN or infinite logits on the clean prompts",), heavy=True),
    Case("overflow-in-float16", discover(on_prior("fp16_overflow"), "model.dtype=float16"), ("NaN or infinite logits", "(it is float16)"), heavy=True),
    # -- the task ----------------------------------------------------------------------
    Case("task-path-missing", validate(lambda w, d: good(w, d, task=d / "nowhere.jsonl")), ("task.path", "does not exist")),
    Case("task-dir-without-spec", validate(lambda w, d: (d / "t").mkdir() or good(w, d, task=d / "t")), ("no task.yaml",)),
    Case("task-spec-malformed", validate(spec_task("name: x\npairs: [\n")), ("task.yaml", "malformed YAML")),
    Case("task-spec-python-tag", validate(spec_task("name: !!python/object/apply:os.getcwd []\npairs: pairs.jsonl\n", GOOD_PAIR)),
         ("task.yaml (line 1, column 7)", "'!!python/object/apply:os.getcwd' is not allowed")),
    Case("task-spec-unknown-key", validate(spec_task("name: x\npairs: pairs.jsonl\ncolour: red\n", GOOD_PAIR)), ("task.yaml", "colour")),
    Case("task-spec-no-source", validate(spec_task("name: x\n")), ("task.yaml", "exactly one of 'pairs'")),
    Case("task-spec-pairs-missing", validate(spec_task("name: x\npairs: gone.jsonl\n")), ("gone.jsonl", "does not exist")),
    Case("empty-task-file", validate(lambda w, d: good(w, d, task=pairs_file(d))), ("no prompt pairs",)),
    Case("jsonl-line-not-json", validate(lambda w, d: good(w, d, task=pairs_file(d, GOOD_PAIR, "{clean: [1, 2]"))), ("pairs.jsonl line 2", "not valid JSON")),
    Case("pair-missing-answers", validate(lambda w, d: good(w, d, task=pairs_file(d, GOOD_PAIR, pair(answers=None)))), ("line 2", "'answers' is missing")),
    Case("pair-unknown-field", validate(lambda w, d: good(w, d, task=pairs_file(d, pair(answer=[2])))), ("line 1", "unknown field(s) answer")),
    Case("pair-answers-wrong-type", validate(lambda w, d: good(w, d, task=pairs_file(d, pair(answers={"a": 1})))), ("line 1", "'answers' must be")),
    Case("pair-position-not-int", validate(lambda w, d: good(w, d, task=pairs_file(d, pair(positions={"S": "two"})))), ("line 1", "'positions'")),
    Case("pair-is-not-an-object", validate(lambda w, d: good(w, d, task=pairs_file(d, GOOD_PAIR, [1, 2]))), ("line 2", "JSON object")),
    Case("pair-lengths-differ-ids", discover(with_pairs(GOOD_PAIR, pair(corrupt=[9, 1, 5]))),
         ("pairs.jsonl line 2", "clean prompt is 6 tokens but corrupt is 3"), heavy=True),
    Case("pair-lengths-differ-text", discover(with_pairs(pair(clean="w2 w1 w5", corrupt="w9 w1 w5 w4", answers=["w2"], wrong_answers=["w9"]), model_of=lambda w: w.tok_model)),
         ("line 1", "clean prompt is 3 tokens but corrupt is 4"), heavy=True),
    Case("answer-multi-token", discover(with_pairs(pair(clean="w2 w1 w5", corrupt="w9 w1 w5", answers=["w2 w3"], wrong_answers=["w9"]), model_of=lambda w: w.tok_model)),
         ("line 1", "'w2 w3' is 2 tokens", "single tokens"), heavy=True),
    Case("answer-out-of-vocabulary-text", discover(with_pairs(pair(clean="w2 w1 w5", corrupt="w9 w1 w5", answers=["mary"], wrong_answers=["w9"]), model_of=lambda w: w.tok_model)),
         ("line 1", "'mary' is not in the tokenizer's vocabulary"), heavy=True),
    Case("answer-id-out-of-vocabulary", discover(with_pairs(GOOD_PAIR, pair(answers=[99]))), ("line 2", "answer id 99 is outside the vocabulary"), heavy=True),
    Case("prompt-token-out-of-vocabulary", discover(with_pairs(pair(clean=[2, 1, 500, 11, 4, 7]))), ("line 1", "token id 500 outside the vocabulary"), heavy=True),
    Case("position-outside-prompt", discover(with_pairs(pair(positions={"S2": 6}))), ("line 1", "position 'S2' = 6 is outside the prompt"), heavy=True),
    Case("text-prompt-without-tokenizer", discover(with_pairs(pair(clean="w2 w1", corrupt="w9 w1"))), ("line 1", "no tokenizer"), heavy=True),
    Case("prompt-longer-than-context", discover(with_pairs(pair(clean=[1] * 9, corrupt=[2] * 9))), ("line 1", "longer than the model's context (8)"), heavy=True),
    Case("metric-needs-wrong-answers", discover(with_pairs(pair(wrong_answers=None))), ("line 1", "needs 'wrong_answers'", "metric: kl"), heavy=True),
    # -- outputs and other commands ------------------------------------------------------
    Case("output-dir-holds-a-run", discover(lambda w, d: good(w, d, output=w.prior), force=False), ("holds an earlier run", "--force")),
    Case("output-dir-is-a-file", discover(lambda w, d: (d / "f").write_text("x") and good(w, d, output=d / "f"), force=False), ("is not a directory",)),
    Case("output-dir-read-only", read_only_output, ("cannot be written",)),
    Case("rerun-from-non-run-dir", lambda w, d: ["discover", "--from", str(d)], ("--from", "no config.yaml")),
    Case("evaluate-circuit-of-another-model", other_model_circuit, ("made for a model with 2 layers x 3 heads", "1 x 3"), heavy=True),
    Case("evaluate-mib-with-unknown-edges", foreign_mib_circuit, ("edge 'a3.h0->logits' does not exist",), heavy=True),
    Case("evaluate-circuit-not-json", not_json_circuit, ("circuit.json", "not valid JSON", "line 1"), heavy=True),
    Case("evaluate-circuit-missing", lambda w, d: ["evaluate", "faithfulness", str(d / "gone.json")], ("gone.json", "does not exist")),
    Case("evaluate-would-overwrite", lambda w, d: ["evaluate", "faithfulness", str(w.prior)], ("faithfulness.json already exists", "--force")),
    Case("evaluate-known-file-missing", lambda w, d: ["evaluate", "faithfulness", str(w.prior), "--known", str(d / "edges.txt"), "--force"], ("--known", "does not exist")),
    Case("unknown-command", lambda w, d: ["discovr"], ("No such command",)),
    Case("unknown-option", lambda w, d: ["discover", "--frce"], ("No such option",)),
]
assert len({c.id for c in CASES}) == len(CASES)


# ------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------
def run_subprocess(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **env}
    result = subprocess.run([sys.executable, "-m", "circuitctl", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def run_in_process(args: list[str], cwd: Path, env: dict[str, str], capsys, monkeypatch) -> tuple[int, str, str]:
    from circuitctl.cli.app import main

    monkeypatch.chdir(cwd)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# A sample of cases also run as real processes (`python -m circuitctl`), showing that the
# in-process runs report exactly what a user sees; the rest run in-process for speed.
REAL_PROCESS = ["malformed-yaml", "python-object-tag", "unknown-method", "pretrained-not-cached-offline",
                "jsonl-line-not-json", "output-dir-holds-a-run", "evaluate-circuit-missing", "unknown-command"]


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def check(case: Case, world: World, tmp_path: Path, run) -> None:
    before = _snapshot(world.prior)
    args = case.build(world, tmp_path)
    env = {k: v.replace("{case}", str(tmp_path)) for k, v in case.env.items()}
    code, out, err = run(args, tmp_path, env)
    context = f"args={args}\nstdout={out}\nstderr={err}"
    assert code == case.code, context
    assert "Traceback" not in err and "Traceback" not in out, context
    assert len(MESSAGE.findall(err)) == 1, "exactly one message\n" + context
    assert out.strip() == "", context
    for part in case.expect:
        assert part in err, f"expected {part!r}\n{context}"
    assert _snapshot(world.prior) == before, "the earlier run was modified"
    for name in case.absent:
        assert not (tmp_path / name).exists(), f"{name} exists after a failed run"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, capsys, monkeypatch):
    check(case, world, tmp_path, lambda args, cwd, env: run_in_process(args, cwd, env, capsys, monkeypatch))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in REAL_PROCESS], ids=REAL_PROCESS)
def test_bad_input_real_process(case: Case, world: World, tmp_path: Path):
    assert not case.heavy
    check(case, world, tmp_path, run_subprocess)


# ------------------------------------------------------------------------------------------
# Properties that need more than one case
# ------------------------------------------------------------------------------------------
def test_failed_run_leaves_no_empty_run_directory(world: World, tmp_path, capsys, monkeypatch):
    config = cfg_file(tmp_path, _config(world.variants["overflow"], world.task, output=tmp_path / "fresh" / "run"))
    code, _, err = run_in_process(["discover", config], tmp_path, {}, capsys, monkeypatch)
    assert code == 2, err
    assert not (tmp_path / "fresh" / "run").exists()


def test_debug_shows_the_traceback(world: World, tmp_path):
    config = cfg_file(tmp_path, good(world, tmp_path, method="eapp"))
    code, _, err = run_subprocess(["--debug", "validate", config], tmp_path, {})
    assert code == 2
    assert "Traceback" in err and "unknown method 'eapp'" in err


def test_offline_pretrained_name_fails_before_transformer_lens(tmp_path):
    """A pretrained name that cannot load offline fails fast: before torch/TL are imported."""
    (tmp_path / "run.yaml").write_text(
        "model: {name: gpt2}\ntask: {name: ioi}\nmethod: {name: eap}\noutput: {dir: out}\n"
    )
    script = (
        "import sys\n"
        "from circuitctl.cli.app import main\n"
        "try:\n"
        "    main(['discover', 'run.yaml'])\n"
        "finally:\n"
        "    print('loaded:', sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr and "model.name" in result.stderr
    assert "loaded: []" in result.stdout
    assert seconds < 10, f"took {seconds:.1f}s"
    assert not (tmp_path / "out").exists()


def test_nothing_is_loaded_unsafely():
    """Configs and checkpoints are data: no unsafe YAML, pickle, eval/exec, or torch.load
    without weights_only=True anywhere in the package."""
    import ast

    package = Path(__file__).resolve().parents[2] / "circuitctl"
    unsafe = {("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("pickle", "load"), ("pickle", "loads")}
    problems = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            where = f"{path.relative_to(package.parent)}:{node.lineno}"
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                problems.append(f"{where}: {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                call = (func.value.id, func.attr)
                if call in unsafe:
                    problems.append(f"{where}: {'.'.join(call)}()")
                if call == ("torch", "load"):
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    if not (weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
    assert not problems, problems
