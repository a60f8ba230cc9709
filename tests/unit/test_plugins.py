"""Plugins: methods and metrics from another installed distribution, found through entry
points (groups ``circuitctl.methods`` and ``circuitctl.metrics``).

Each test writes a fake distribution (a ``*.dist-info`` with ``entry_points.txt`` beside its
package) into a temporary directory and runs circuitctl in a subprocess with that directory
on ``PYTHONPATH``, so nothing is installed and this process's registries stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = {
    # The method table entries: no torch at import time, so `validate` stays light.
    "fake_circuit_plugin/__init__.py": '''
        from typing import Literal

        from pydantic import Field

        from circuitctl.config.methods import MethodInfo, MethodSettings


        class RandomScoresSettings(MethodSettings):
            name: Literal["random_scores"] = "random_scores"
            scale: float = Field(1.0, gt=0, description="scores are uniform in [0, scale)")


        class FailingSettings(MethodSettings):
            name: Literal["failing_method"] = "failing_method"


        RANDOM_SCORES = MethodInfo("random_scores", RandomScoresSettings, "fake_circuit_plugin.impl:random_scores", "seeded random edge scores")
        FAILING = MethodInfo("failing_method", FailingSettings, "fake_circuit_plugin.impl:failing", "raises")
        NOT_AN_INFO = {"name": "wrong_type"}
        MISNAMED = MethodInfo("another_name", RandomScoresSettings, "fake_circuit_plugin.impl:random_scores", "misnamed")
    ''',
    "fake_circuit_plugin/impl.py": '''
        import torch

        from circuitctl.methods.base import DiscoveryResult


        def random_scores(context, settings):
            generator = torch.Generator().manual_seed(context.seed)
            graph = context.graph
            scores = torch.rand(graph.n_upstream, graph.n_downstream, generator=generator) * settings.scale
            return DiscoveryResult(scores=scores * graph.edge_mask, forward_passes=0.0)


        def failing(context, settings):
            raise RuntimeError("boom from the plugin")
    ''',
    "fake_circuit_plugin/metric.py": '''
        from circuitctl.metrics.metrics import Metric


        def answer_logit(logits, batch, reference=None):
            mask = batch.answers >= 0
            return (logits.gather(1, batch.answers.clamp(min=0)) * mask).sum(1) / mask.sum(1)


        ANSWER_LOGIT = Metric("answer_logit", answer_logit, -1.0, False, "mean logit of the answers")
    ''',
    "fake_circuit_plugin-0.1.dist-info/METADATA": '''
        Metadata-Version: 2.1
        Name: fake-circuit-plugin
        Version: 0.1
    ''',
    "fake_circuit_plugin-0.1.dist-info/entry_points.txt": '''
        [circuitctl.methods]
        random_scores = fake_circuit_plugin:RANDOM_SCORES
        failing_method = fake_circuit_plugin:FAILING
        broken_method = fake_circuit_plugin_is_not_installed:INFO
        wrong_type = fake_circuit_plugin:NOT_AN_INFO
        misnamed = fake_circuit_plugin:MISNAMED

        [circuitctl.metrics]
        answer_logit = fake_circuit_plugin.metric:ANSWER_LOGIT
    ''',
}

# Runs several CLI calls in one process (importing TransformerLens once) and reports each
# call's exit code and stderr, plus the plugin metric computed directly for comparison.
DRIVER = '''
import contextlib, io, json, sys
from circuitctl.cli.app import main

results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    results.append({"args": args, "code": code, "stderr": err.getvalue()})

from circuitctl.config.load import load_config
from circuitctl.session import open_session
from fake_circuit_plugin.metric import answer_logit
session = open_session(load_config("run.yaml"), None)
data = session.data
logits = session.adapter.run(data.clean, data.answer_positions).logits
print(json.dumps({"results": results, "answer_logit_full": float(answer_logit(logits, data).mean())}))
'''


@pytest.fixture(scope="module")
def plugin_world(tmp_path_factory) -> Path:
    from circuitctl.testing import planted

    root = tmp_path_factory.mktemp("plugins")
    for name, text in PACKAGE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip())
    planted.export(planted.build("copy_first"), root / "model", root / "task")
    (root / "run.yaml").write_text(
        "model: {path: model, device: cpu}\ntask: {path: task}\nmethod: {name: random_scores, scale: 2.0}\n"
        "metric: answer_logit\nselection: {top_n: 4}\noutput: {dir: run}\nseed: 3\n"
    )
    (root / "fail.yaml").write_text("model: {path: model}\ntask: {path: task}\nmethod: {name: failing_method}\noutput: {dir: failed}\n")
    return root


def circuitctl(root: Path, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "circuitctl", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_validate_accepts_plugin_method_and_metric(plugin_world):
    result = circuitctl(plugin_world, "validate", "run.yaml")
    assert result.returncode == 0, result.stderr
    assert "method random_scores, metric answer_logit" in result.stderr


def test_methods_lists_plugins(plugin_world):
    result = circuitctl(plugin_world, "methods")
    assert result.returncode == 0, result.stderr
    assert "random_scores" in result.stdout and "seeded random edge scores" in result.stdout
    assert "eap" in result.stdout  # a broken plugin does not hide the built-ins


@pytest.mark.parametrize(
    "override, expected",
    [
        ("metric=answer_logits", "did you mean 'answer_logit'"),
        ("method.name=random_score", "did you mean 'random_scores'"),
        ("method.scales=2", "method.scales (line 3): unknown key; did you mean 'scale'"),
        ("method.scale=-1", "method.scale (line 3): Input should be greater than 0"),
        ("method.name=broken_method", "failed to load: ModuleNotFoundError"),
        ("method.name=wrong_type", "is a dict, not a MethodInfo"),
        ("method.name=misnamed", "is named 'another_name'"),
    ],
)
def test_plugin_names_and_settings_are_validated(plugin_world, override, expected):
    result = circuitctl(plugin_world, "validate", "run.yaml", override)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_discover_runs_plugin_method_and_metric(plugin_world):
    import torch

    from circuitctl.graph.graph import Graph, GraphSpec

    calls = [
        ["discover", "run.yaml"],
        ["discover", "fail.yaml"],
        ["--debug", "discover", "fail.yaml"],
    ]
    result = circuitctl(plugin_world, json.dumps(calls), script=DRIVER)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ok, failed, failed_debug = report["results"]

    assert ok["code"] == 0, ok["stderr"]
    record = json.loads((plugin_world / "run" / "circuit.json").read_text())
    assert record["method"]["name"] == "random_scores" and record["metric"] == "answer_logit"
    # the plugin's scores, exactly: seeded uniform [0, 2) on this model's edges
    graph = Graph(GraphSpec(n_layers=1, n_heads=3, has_mlps=False))
    expected = torch.rand(graph.n_upstream, graph.n_downstream, generator=torch.Generator().manual_seed(3)) * 2.0
    for name, entry in record["edges"].items():
        assert entry["score"] == pytest.approx(float(expected[graph.edge_index(name)]), abs=1e-6), name
    # the plugin metric was used for the full model's value
    assert record["results"]["metric_full"] == pytest.approx(report["answer_logit_full"], abs=1e-4)

    # an exception inside a plugin is an internal error: exit 1, no traceback unless --debug
    assert failed["code"] == 1, failed["stderr"]
    assert "internal error: RuntimeError: boom from the plugin" in failed["stderr"]
    assert "Traceback" not in failed["stderr"]
    assert failed_debug["code"] == 1 and "Traceback" in failed_debug["stderr"]
    assert not (plugin_world / "failed").exists()
