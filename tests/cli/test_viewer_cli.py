"""circuit.html as runs write it: `discover` writes the page beside every circuit (each point of
a sweep), `evaluate faithfulness` beside the circuit rewrites it with the curve, a viewer
problem is a note and never a failed run, and `circuitctl view` (re)writes it."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from testkit import cli_exit_code
from viewer_records import GOLDEN, SCHEMA2_KINDS, check_payload, read_json, schema2_runs

from circuitctl.circuits.record import load_circuit_file


def embedded(path) -> dict:
    match = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', path.read_text(), re.S)
    assert match, f"no embedded data in {path}"
    return json.loads(match.group(1))


cli = cli_exit_code  # circuitctl ARGS in this process -> its exit code


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return schema2_runs(tmp_path_factory)


@pytest.mark.parametrize("name", sorted(SCHEMA2_KINDS))
def test_discover_writes_the_page_of_every_kind(runs, name):
    root, summaries = runs
    run = root / name
    loaded = load_circuit_file(run / "circuit.json")
    assert loaded.source == "circuitctl v2" and loaded.kind == SCHEMA2_KINDS[name]
    faithfulness = read_json(run / "faithfulness.json")
    data = embedded(run / "circuit.html")
    assert data["meta"]["kind"] == SCHEMA2_KINDS[name]
    from circuitctl.viewer import payload_from_record
    from circuitctl.viewer.page import compact

    explanation = read_json(run / "explanation.json")  # discover explains before it writes the page
    assert explanation is not None and data["meta"]["explanation"] == explanation
    payload = payload_from_record(loaded.record, faithfulness, explanation)
    check_payload(loaded.record, faithfulness, payload)
    assert data == json.loads(json.dumps(compact(payload)))  # the page holds exactly this payload
    summary = summaries[name.split("/")[0]]["discover"]
    page = "circuit.html" if "/" not in name else f"{name.split('/')[1]}/circuit.html"
    assert page in summary.files and not any("circuit.html" in note for note in summary.notes)


def test_a_sweep_writes_one_page_per_point(runs):
    root, summaries = runs
    files = summaries["acdc_sweep"]["discover"].files
    assert [f for f in files if f.endswith("circuit.html")] == ["tau-0.01/circuit.html", "tau-0.1/circuit.html"]
    assert not (root / "acdc_sweep" / "circuit.html").exists()
    titles = {embedded(root / "acdc_sweep" / point / "circuit.html")["meta"]["title"] for point in ("tau-0.01", "tau-0.1")}
    assert len(titles) == 2 and all("acdc tau=" in title for title in titles)


@pytest.mark.parametrize("name", ["edge", "sfc"])
def test_evaluating_beside_the_circuit_puts_the_curve_on_the_page(runs, name):
    root, summaries = runs
    run = root / name
    report = json.loads((run / "faithfulness.json").read_text())
    evaluated = summaries[name]["evaluate"]
    assert run / "circuit.html" in evaluated["files"] and evaluated["notes"] == []
    curve = embedded(run / "circuit.html")["meta"]["faithfulness"]
    assert curve["x"] == report["curve_sizes"] and curve["curve_absolute"] == pytest.approx(report["curve_absolute"])
    assert curve["faithfulness"] == pytest.approx(report["faithfulness"])
    assert (curve["cpr"] is None) == (name == "sfc") and curve["percentages"] == report["percentages"]


def test_a_viewer_failure_is_a_note_not_a_failed_run(tmp_path, monkeypatch):
    from circuitctl.batching import collect_notes
    from circuitctl.config.load import load_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.resources import shipped_config
    from circuitctl.runner import discover
    from circuitctl.viewer import run_dir

    def broken(payload):
        raise RuntimeError("the template is gone")

    monkeypatch.setattr(run_dir, "render_html", broken)
    config_file = shipped_config("planted-layernorm-mlp-eap")
    config = load_config(config_file, ["method.name=eap_ig", "method.granularity=neuron", "model.path=models/planted-mlp-neurons",
                                       "task.name=planted-mlp-neurons", f"output.dir={tmp_path / 'run'}"])
    summary = discover(config, config_file.parent)
    assert (tmp_path / "run" / "circuit.json").is_file() and not (tmp_path / "run" / "circuit.html").exists()
    assert "circuit.html" not in summary.files
    assert [n for n in summary.notes if "circuit.html was not written: the template is gone" in n]
    with collect_notes() as notes:
        report, files = evaluate_faithfulness(tmp_path / "run", config, config_file.parent, tmp_path / "run")
    assert (tmp_path / "run" / "faithfulness.json").is_file() and report.n_in_circuit == summary.n_in_circuit
    assert not [f for f in files if f.name == "circuit.html"] and "circuit.html was not written: the template is gone" in notes[-1]
    monkeypatch.undo()
    # evaluated elsewhere (--out), the run's page is left alone
    with collect_notes() as notes:
        _, files = evaluate_faithfulness(tmp_path / "run", config, config_file.parent, tmp_path / "elsewhere")
    assert not (tmp_path / "run" / "circuit.html").exists() and not [f for f in files if f.name == "circuit.html"] and notes == []


def test_view_command_writes_the_page_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    run = tmp_path / "demo"
    shutil.copytree(GOLDEN / "demo", run)
    assert cli(["view", str(run)]) == 0
    assert embedded(run / "circuit.html")["meta"]["title"] == "toy-ioi | eap | 39 edges | f = 0.895"
    assert "self-contained" in capsys.readouterr().out
    monkeypatch.setenv("DISPLAY", "")
    monkeypatch.setenv("WAYLAND_DISPLAY", "")
    assert cli(["view", str(run), "--open"]) == 0 and "no browser available" in capsys.readouterr().out
    before = (run / "circuit.html").read_bytes()
    (run / "explanation.json").write_text("[1, 2]")
    for path, message in ((tmp_path / "missing", "does not exist"), (GOLDEN / "acdc_sweep", "tau-0.01"), (run, "explanation.json")):
        assert cli(["view", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert (run / "circuit.html").read_bytes() == before
