"""The four leaderboard methods through the CLI: shipped configs, run directories, evaluation,
bad configs, and edge pruning interrupted by SIGINT / SIGKILL and resumed to the same circuit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_interrupt import SIGNALS, acdc_world, cli, comparable, interrupt, needs_resume  # noqa: F401  (acdc_world: a fixture)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["method.steps=60", "method.sparsity_warmup_steps=40", "method.lr_warmup_steps=10"]


def test_methods_lists_the_leaderboard_methods(capsys):
    from circuitctl.cli.app import main

    try:
        main(["methods"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    for name in ("edge_pruning", "subnetwork_probing", "ifr", "ensemble"):
        assert name in out


def test_edge_pruning_run_directory_evaluates_like_every_method(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = cli(["discover", str(ROOT / "configs/planted-or-gate-edge-pruning.yaml"), f"output.dir={run}", *SHORT], capsys)
    assert code == 0, err
    for name in ("circuit.json", "circuit.mib.json", "circuit.dot", "config.yaml", "edge_pruning_log.json"):
        assert (run / name).exists(), name
    record = json.loads((run / "circuit.json").read_text())
    assert record["results"]["edge_pruning"]["binarized_edges"] >= record["results"]["n_edges_in_circuit"]
    log = json.loads((run / "edge_pruning_log.json").read_text())["points"][0]["log"]
    assert log[-1]["step"] == 59 and {"kl", "sparsity", "target", "lambda1", "lambda2"} <= set(log[-1])
    known = ROOT / "tasks/planted-or-gate/true_edges.txt"
    code, err = cli(["evaluate", "faithfulness", str(run / "circuit.json"), "--known", str(known)], capsys)
    assert code == 0, err
    report = json.loads((run / "faithfulness.json").read_text())
    assert "cpr" in json.dumps(report).lower()


def test_edge_pruning_sweep_writes_one_circuit_per_target(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["discover", str(ROOT / "configs/planted-or-gate-edge-pruning.yaml"), f"output.dir={run}", "method.edges=[3, 6]", *SHORT]
    code, err = cli(args, capsys)
    assert code == 0, err
    sweep = json.loads((run / "sweep.json").read_text())
    assert [p["label"] for p in sweep["points"]] == ["edges-3", "edges-6"]
    assert (run / "edges-3" / "circuit.json").exists() and (run / "edge_pruning_log.json").exists()


def test_ensemble_records_its_members(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = ["model.path=models/planted-v-composition", "task.name=planted-v-composition", f"output.dir={run}", "selection.top_n=3"]
    code, err = cli(["discover", str(ROOT / "configs/toy-ioi-ensemble.yaml"), *overrides], capsys)
    assert code == 0, err
    members = sorted(p.name for p in run.glob("member-*.json"))
    assert members == ["member-0-eap.json", "member-1-eap_ig.json", "member-2-eap_ig.json"]
    assert json.loads((run / "member-2-eap_ig.json").read_text())["method"]["variant"] == "activations"
    record = json.loads((run / "circuit.json").read_text())
    assert record["results"]["faithfulness"] > 0.95  # the planted circuit (3 edges)


def test_subnetwork_probing_writes_its_native_node_circuit(tmp_path, capsys):
    run = tmp_path / "run"
    config = ROOT / "configs/planted-v-composition-subnetwork-probing.yaml"
    code, err = cli(["discover", str(config), f"output.dir={run}", "method.steps=300"], capsys)
    assert code == 0, err
    record = json.loads((run / "circuit.json").read_text())
    in_graph = {name for name, node in record["nodes"].items() if node["in_graph"]} - {"logits"}
    assert in_graph == set(record["results"]["subnetwork_probing"]["native_nodes"])


@pytest.mark.parametrize(
    "override, message",
    [
        ('method.members=[eap, {name: eap_ig, stepz: 3}]', "member 1: eap_ig setting 'stepz': unknown key"),
        ("method.members=[eap, sfc]", "cannot be a member"),
        ("method.members=[eap, eapp]", "did you mean 'eap'"),
    ],
)
def test_a_bad_ensemble_member_is_named(override, message, capsys):
    code, err = cli(["validate", str(ROOT / "configs/toy-ioi-ensemble.yaml"), override], capsys)
    assert code == 2 and message in err and "method.members" in err and "Traceback" not in err


def test_edge_pruning_refuses_two_kinds_of_target(capsys):
    code, err = cli(["validate", str(ROOT / "configs/toy-ioi-edge-pruning.yaml"), "method.sparsity=0.9"], capsys)
    assert code == 2 and "at most one of sparsity and edges" in err


@pytest.mark.slow
@needs_resume
@SIGNALS
def test_interrupted_edge_pruning_resumes_to_the_same_circuit(acdc_world, how, tmp_path, capsys, monkeypatch):  # noqa: F811
    config = acdc_world / "edge_pruning.yaml"
    reference = acdc_world / "edge_pruning-reference"
    if not config.exists():
        record = yaml.safe_load((acdc_world / "acdc.yaml").read_text())
        method = {"name": "edge_pruning", "edges": [30, 60], "steps": 50, "sparsity_warmup_steps": 30, "lr_warmup_steps": 5,
                  "batch_size": 4, "checkpoint_every_seconds": 0.0}
        record.update(method=method, metric="logit_diff", output={"dir": str(reference)})
        config.write_text(yaml.safe_dump(record, sort_keys=False))
    if not (reference / "sweep.json").exists():
        code, err = cli(["discover", str(config)], capsys)
        assert code == 0, err

    run = tmp_path / "run"
    saved = interrupt(["discover", str(config), f"output.dir={run}"], run, 65, how)  # into the second target
    assert saved["method"] == "edge_pruning" and saved["state"]["point"] == 1

    from circuitctl.methods import edge_pruning

    calls = []
    original = edge_pruning._step
    monkeypatch.setattr(edge_pruning, "_step", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    code, err = cli(["discover", str(config), f"output.dir={run}", "--resume", str(run)], capsys)
    assert code == 0, err
    assert len(calls) == 50 - saved["state"]["step"]  # only the unfinished steps
    for label in ("edges-30", "edges-60"):
        assert comparable(run / label) == comparable(reference / label)
    assert json.loads((run / "edge_pruning_log.json").read_text()) == json.loads((reference / "edge_pruning_log.json").read_text())
    assert not (run / "checkpoint").exists()
