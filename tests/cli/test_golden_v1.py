"""The redesign keeps results: the demo writes the files it wrote before (schema 1), and circuit
files of every kind written before it (tests/golden/v1, see its README) still evaluate to the
faithfulness recorded beside them."""

from __future__ import annotations

import json

import pytest
from testkit import GOLDEN, cli_exit_code, golden_copy

# what schema 2 adds or changes in the demo's circuit.json; everything else is byte-identical
CHANGED = {
    ("schema_version",),  # 1 -> 2
    ("space",),  # new: {"kind": "edge"}
    ("created",), ("timings",), ("library_versions",),  # volatile: when, how fast, with which installed versions
    ("config_hash",), ("config", "selection", "reselect"), ("selection", "reselect"),  # new selection switch
    ("results", "unit"), ("results", "chosen_by"),  # new: the counted unit, the rule that chose the circuit
    ("task", "origin"), ("config", "output"),  # where the task file and the run directory are
    ("task_signal",), ("config", "checks"),  # new: the task's clean-corrupt gap and accuracy, and its check's switch
    ("config", "explain"),  # new: explain the circuit at the end of discover
    ("config", "cache_gib"),  # new: the batch cache's device budget
}


cli = cli_exit_code  # circuitctl ARGS in this process -> its exit code


def without_changes(record: dict) -> str:
    for path in CHANGED:
        target = record
        for key in path[:-1]:
            target = target.get(key, {})
        target.pop(path[-1], None)
    return json.dumps(record, indent=1)


def assert_same_record(new: dict, old: dict) -> None:
    """Equal records, edge scores to a relative 1e-5. The redesign wrote the demo's files byte
    for byte as version 1 did (tested at commit b17bfb9); computing the normalisation's input
    gradient by formula instead of autograd (EAP's speed-up) later moved the scores' last bits,
    so scores are compared to that precision, everything else exactly."""
    new_scores = {name: item.pop("score") for name, item in new["edges"].items()}
    old_scores = {name: item.pop("score") for name, item in old["edges"].items()}
    assert new_scores == pytest.approx(old_scores, rel=1e-5, abs=1e-9)
    assert without_changes(new) == without_changes(old)


def test_the_demo_writes_the_files_it_wrote_before(tmp_path):
    assert cli(["discover", "demo", f"output.dir={tmp_path / 'demo'}"]) == 0
    new, old = tmp_path / "demo", GOLDEN / "demo"
    # the MIB file as the EAP-IG reference writes it (issue 21): node entries without a null score
    mib_old = json.loads((old / "circuit.mib.json").read_text())
    for item in mib_old["nodes"].values():
        assert item.pop("score") is None
    assert_same_record(json.loads((new / "circuit.mib.json").read_text()), mib_old)
    from circuitctl.explain.drawing import without_labels

    assert without_labels((new / "circuit.dot").read_text()) == (old / "circuit.dot").read_text()  # + explain's labels
    assert (new / "explanation.json").is_file()
    record = json.loads((new / "circuit.json").read_text())
    assert record["schema_version"] == 2 and record["space"] == {"kind": "edge"}
    assert_same_record(record, json.loads((old / "circuit.json").read_text()))


CASES = {  # run directory: overrides (version 1 evaluated every feature circuit with mean ablation)
    "node": [], "neuron": [], "acdc": [], "cdt": [], "sfc": ["ablation=mean"],
    "demo": [], "pos_edge": [], "pos_node": [], "path_patching": [],
}
TOY_GPT = ("demo", "pos_edge", "pos_node", "path_patching")  # slower: in the slow tier


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in TOY_GPT else n for n in CASES])
def test_version_1_circuit_files_still_evaluate(name, tmp_path):
    run = golden_copy(name, tmp_path)
    # version 1's curve: circuitctl's own rule (MIB's exact rule is the default now)
    assert cli(["evaluate", "faithfulness", str(run), *CASES[name], "--curve", "circuitctl", "--out", str(tmp_path / "report")]) == 0
    old = json.loads((run / "faithfulness.json").read_text())
    new = json.loads((tmp_path / "report" / "faithfulness.json").read_text())
    assert new["faithfulness"] == pytest.approx(old["faithfulness"], abs=1e-6)
    assert new["completeness"] == pytest.approx(old["completeness"], abs=1e-6)
    if "cpr" in old:
        assert new["cpr"] == pytest.approx(old["cpr"], abs=1e-6) and new["cmd"] == pytest.approx(old["cmd"], abs=1e-6)
    else:  # version 1's feature curve: f of the top-n nodes by |score|
        assert new["curve_sizes"] == old["curve_n_nodes"]
        assert new["curve_absolute"] == pytest.approx(old["curve_faithfulness"], abs=1e-6)
