"""Fuzzed configs and task files (Hypothesis): `validate` and `discover` either accept an input
or exit 2 with one message: never a traceback, never an internal error, never a hang.

Configs are a valid config with random changes: any key (known or not) set to any value
(wrong types, huge numbers, NaN and infinities, unicode and control characters, nested lists
and mappings), sections replaced whole, or the whole file replaced by random YAML text; plus
nesting deeper than the parsers recurse. Task files are valid pairs with random changes to
their fields, random JSON lines and random text lines. Each example has a time limit (SIGALRM).

Example counts are modest so that the file runs in well under a minute on a laptop:
`FUZZ_EXAMPLES` (environment variable, default 60 for validate and 20 for discover; the
README's reliability section records them). A failing example is printed by Hypothesis.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from helpers import planted_module
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
DISCOVER_EXAMPLES = max(1, EXAMPLES // 3)
MESSAGE = re.compile(r"^(error|Error|internal error):", re.MULTILINE)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared machine's timing varies; hangs are caught by `time_limit`
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


class Hang(Exception):
    """An example ran past its time limit."""


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(args: list[str], capsys, seconds: int) -> tuple[int, str, str]:
    from circuitctl.cli.app import main

    capsys.readouterr()
    with time_limit(seconds):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def accepted_or_one_error(code: int, out: str, err: str, what: str) -> None:
    event(f"exit {code}" + (": " + " ".join(err.split())[-90:] if code == 2 else ""))  # pytest --hypothesis-show-statistics shows how many were accepted
    context = f"{what}\nexit {code}\nstdout={out[-2000:]}\nstderr={err[-3000:]}"
    assert "Traceback" not in out + err, context
    assert code in (0, 2), context
    if code == 2:
        assert len(MESSAGE.findall(err)) == 1 and err.lstrip().startswith("error:"), context


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)  # any unicode, controls included
NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 1e308, -1e-308, math.inf, -math.inf, math.nan]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, st.sampled_from(["eap", "exact", "acdc", "mean", "kl", "cpu", "auto", "float16", ""]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.one_of(TEXT, st.integers()), inner, max_size=4)),
    max_leaves=12,
)
# The right type with extreme values: many such configs are valid and reach deeper code.
EXTREMES = st.one_of(
    NUMBERS,
    st.sampled_from([0, 1, 2, 3, 24, 1000, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -1, -(2**63), 0.5, 1e-30, 1e30]),
    st.booleans(),
    st.sampled_from(["resample", "zero", "mean", "logit_diff", "prob_diff", "kl", "float16", "bfloat16", "float32", "cpu", "auto"]),
)
KEYS = {
    (): ["model", "task", "method", "ablation", "metric", "selection", "output", "checks", "seed", "max_batch_size"],
    ("model",): ["name", "path", "device", "dtype", "n_devices"],
    ("task",): ["name", "path", "n_pairs", "options"],
    ("method",): ["name", "batch_size", "tau", "steps", "granularity", "positions", "candidates_per_pass"],
    ("ablation",): ["type", "per_position"],
    ("selection",): ["top_n", "threshold", "fraction", "absolute", "prune"],
    ("output",): ["dir"],
    ("checks",): ["allow_small_gap"],
}
KEY_PATHS = [(*section, key) for section, keys in KEYS.items() for key in keys]


RUN_KEYS = [("seed",), ("metric",), ("ablation",), ("ablation", "type"), ("ablation", "per_position"), ("selection", "top_n"),
            ("selection", "threshold"), ("selection", "fraction"), ("selection", "absolute"), ("model", "dtype"),
            ("max_batch_size",), ("method", "batch_size"), ("task", "n_pairs"), ("checks", "allow_small_gap")]


@st.composite
def mutated_config(draw, base: dict, key_paths=KEY_PATHS, values=VALUES, most: int = 4) -> dict:
    """`base` with 1 to `most` keys set to random values (sometimes a key nobody knows)."""
    config = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, most))):
        path = draw(st.sampled_from(key_paths))
        if most > 1 and draw(st.integers(0, 9)) == 0:
            path = (*path[:-1], draw(TEXT))  # an unknown key
        target = config
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = draw(values)
    return config


def deep(depth: int, kind: str) -> str:
    return {"list": "[" * depth + "]" * depth, "map": "{a: " * depth + "1" + "}" * depth}[kind]


# ------------------------------------------------------------------------------------------
# validate
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    planted = planted_module()
    root = tmp_path_factory.mktemp("fuzz")
    model, task = planted.export(planted.build("copy_first"), root / "model", root / "task")
    pairs = [json.loads(line) for line in (task / "pairs.jsonl").read_text().splitlines()]
    base = {
        "model": {"path": str(model), "device": "cpu"},
        "task": {"path": str(task / "pairs.jsonl")},
        "method": {"name": "eap"},
        "output": {"dir": str(root / "runs" / "run")},
    }
    return {"root": root, "model": model, "task": task, "pairs": pairs, "base": base}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@FUZZ
@given(data=st.data())
def test_validate_fuzzed_configs(world, data, capsys, tmp_path):
    shape = data.draw(st.integers(0, 9))
    if shape == 0:
        text = data.draw(st.text(max_size=200))  # not necessarily YAML at all
    elif shape == 1:
        text = f"model: {deep(data.draw(st.sampled_from([50, 5000])), data.draw(st.sampled_from(['list', 'map'])))}\n"
    else:
        # random trees at up to 4 keys; one key set to the right type at its extremes; or the
        # settings an EAP run has set to such values (many of these configs are valid)
        config = data.draw(
            mutated_config(world["base"], values=VALUES) if shape < 6
            else mutated_config(world["base"], values=EXTREMES, most=1) if shape < 8
            else mutated_config(world["base"], RUN_KEYS + [("model", "device"), ("output", "dir")], EXTREMES, most=2)
        )
        text = yaml.safe_dump(config, allow_unicode=data.draw(st.booleans()))
    overrides = []
    if data.draw(st.integers(0, 3)) == 0:  # key=value overrides on the command line, parsed as YAML
        override = st.builds(lambda k, v: f"{'.'.join(k)}={v}", st.sampled_from(KEY_PATHS), st.one_of(TEXT, EXTREMES.map(str)))
        overrides = data.draw(st.lists(override, min_size=1, max_size=2))
    config_file = write(tmp_path / "fuzz.yaml", text)
    code, out, err = run_cli(["validate", config_file, *overrides], capsys, seconds=30)
    accepted_or_one_error(code, out, err, f"config:\n{text[:3000]}\noverrides: {overrides}")


# ------------------------------------------------------------------------------------------
# discover
# ------------------------------------------------------------------------------------------
PAIR_FIELDS = ["clean", "corrupt", "answers", "wrong_answers", "positions", "meta"]


@st.composite
def task_line(draw, good: dict) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=80).map(lambda t: t.replace("\n", " ").replace("\r", " ")))  # not JSON
    if kind == 1:
        return json.dumps(draw(VALUES), allow_nan=True)  # JSON, not a pair
    if kind == 2:
        return deep(draw(st.sampled_from([100, 50_000])), "list")
    record = dict(good)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(PAIR_FIELDS + ["answer", "extra"]))
        record[field] = draw(st.one_of(VALUES, st.lists(NUMBERS, max_size=8), st.dictionaries(TEXT, NUMBERS, max_size=3)))
    return json.dumps(record, allow_nan=True, ensure_ascii=draw(st.booleans()))



@settings(FUZZ, max_examples=DISCOVER_EXAMPLES)
@given(data=st.data())
def test_discover_fuzzed_task_files_and_settings(world, data, capsys, tmp_path):
    """A task file of good pairs with 1-3 bad lines, and a config with random run settings (the
    method stays EAP: settings that ask for unbounded work, e.g. a billion EAP-IG steps, are a
    request, not a hang)."""
    good = world["pairs"]
    mode = data.draw(st.sampled_from(["bad lines", "odd settings", "both"]))
    lines = [json.dumps(p) for p in good[: data.draw(st.integers(1, 6))]]
    for _ in range(data.draw(st.integers(1, 3)) if mode != "odd settings" else 0):
        lines.insert(data.draw(st.integers(0, len(lines))), data.draw(task_line(good[0])))
    task = write(tmp_path / "pairs.jsonl", "\n".join(lines) + "\n")
    base = dict(world["base"], task={"path": str(task)}, output={"dir": str(tmp_path / "run")})
    odd = st.one_of(EXTREMES, EXTREMES, EXTREMES, SCALARS)  # mostly the right type, so that many runs reach the model
    config = data.draw(mutated_config(base, RUN_KEYS, odd)) if mode != "bad lines" else base
    config_file = write(tmp_path / "fuzz.yaml", yaml.safe_dump(config, allow_unicode=True))
    code, out, err = run_cli(["discover", config_file, "--force"], capsys, seconds=120)
    accepted_or_one_error(code, out, err, f"config:\n{yaml.safe_dump(config)}\ntask:\n" + "\n".join(lines)[:3000])
    if code == 0:
        record = json.loads((tmp_path / "run" / "circuit.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in circuit.json"))
        assert record["task"]["n_pairs"] >= 1
