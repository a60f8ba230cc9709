"""The run's metric: the config's `metric` if it names one, else the task's, else logit_diff.

Runs on the shipped planted-copy-first model and pairs (1 layer, 24 pairs: seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from circuitctl.config.load import config_hash, load_config
from circuitctl.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "planted-copy-first"
PAIRS = ROOT / "tasks" / "planted-copy-first" / "pairs.jsonl"


def make_task(directory: Path, metric: str | None) -> Path:
    """A copy of the planted copy-first task whose spec names `metric` (or no metric)."""
    directory.mkdir(parents=True)
    shutil.copy(PAIRS, directory / "pairs.jsonl")
    spec = {"name": "copy_first", "version": 1, "pairs": "pairs.jsonl"}
    if metric is not None:
        spec["metric"] = metric
    (directory / "task.yaml").write_text(yaml.safe_dump(spec))
    return directory


def write_config(path: Path, task: str, metric: str | None = None, **extra) -> Path:
    config = {"model": {"path": str(MODEL), "device": "cpu"}, "task": {"path": task}, "method": {"name": "eap", "batch_size": 24}, **extra}
    if metric is not None:
        config["metric"] = metric
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(config_path: Path, out: Path) -> dict:
    from circuitctl.runner import discover

    summary = discover(load_config(config_path, [f"output.dir={out}"]), config_path.parent)
    return json.loads((summary.run_dir / "circuit.json").read_text())


@pytest.fixture
def work(tmp_path) -> Path:
    make_task(tmp_path / "prob_task", "prob_diff")
    make_task(tmp_path / "plain_task", None)
    return tmp_path


def test_a_config_without_metric_uses_the_tasks_metric_and_records_it(work, monkeypatch):
    config_path = write_config(work / "run.yaml", "prob_task")
    config = load_config(config_path)
    assert config.metric == "prob_diff"
    record = run(config_path, work / "runs" / "a")
    assert record["metric"] == "prob_diff" and record["config"]["metric"] == "prob_diff"
    assert -1.0 <= record["results"]["metric_full"] <= 1.0  # a probability difference, not a logit difference
    saved = yaml.safe_load((work / "runs" / "a" / "config.yaml").read_text())
    assert saved["metric"] == "prob_diff"  # the rerun names the metric it used
    assert record["config_hash"] == config_hash(config) == config_hash(load_config(work / "runs" / "a" / "config.yaml"))

    # discover --from RUN_DIR reruns the same experiment: same metric, same hash
    from circuitctl.cli.app import main

    monkeypatch.chdir(work)
    main(["discover", "--from", str(work / "runs" / "a"), f"output.dir={work / 'runs' / 'b'}"])
    again = json.loads((work / "runs" / "b" / "circuit.json").read_text())
    assert again["metric"] == "prob_diff" and again["config_hash"] == record["config_hash"]
    assert again["results"]["metric_full"] == pytest.approx(record["results"]["metric_full"])

    # evaluate faithfulness reports the metric that was used
    from circuitctl.evaluation import evaluate_faithfulness

    report, _ = evaluate_faithfulness(work / "runs" / "a", load_config(work / "runs" / "a" / "config.yaml"), work / "runs" / "a", work / "eval")
    assert report.metric == "prob_diff" and report.metric_full == pytest.approx(record["results"]["metric_full"])


def test_the_configs_metric_wins_over_the_tasks(work):
    config_path = write_config(work / "run.yaml", "prob_task", metric="logit_diff")
    assert load_config(config_path).metric == "logit_diff"
    assert load_config(write_config(work / "kl.yaml", "prob_task"), ["metric=kl"]).metric == "kl"  # an override names it too
    record = run(config_path, work / "runs" / "explicit")
    assert record["metric"] == "logit_diff" and record["config"]["metric"] == "logit_diff"
    assert record["results"]["metric_full"] > 1.0  # the planted model's clean logit difference


def test_a_task_without_metric_gives_logit_diff(work):
    for task in ("plain_task", str(PAIRS)):  # a spec naming no metric, a bare JSONL file of pairs
        assert load_config(write_config(work / "run.yaml", task)).metric == "logit_diff"
    record = run(work / "run.yaml", work / "runs" / "plain")
    assert record["metric"] == "logit_diff"


def test_task_metrics_of_shipped_tasks_generators_and_broken_specs(work):
    gt = work / "gt.yaml"
    gt.write_text("model: {name: gpt2}\ntask: {name: greater_than}\nmethod: {name: eap}\n")
    assert load_config(gt).metric == "prob_diff"  # the greater-than generator's metric
    shipped = work / "shipped.yaml"
    shipped.write_text(f"model: {{path: {MODEL}}}\ntask: {{name: planted-copy-first}}\nmethod: {{name: eap}}\n")
    assert load_config(shipped).metric == "logit_diff"
    missing = write_config(work / "missing.yaml", "no_such_task")
    assert load_config(missing).metric == "logit_diff"  # the run itself reports the missing task
    make_task(work / "bad_task", "prob_dif")
    with pytest.raises(UsageError, match="unknown metric 'prob_dif'; did you mean 'prob_diff'"):
        load_config(write_config(work / "bad.yaml", "bad_task"))
