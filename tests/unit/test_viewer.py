"""The viewer without a browser or a run: payloads of every circuit kind against their circuit
files (the golden version-1 files, read through `load_circuit_file`), the faithfulness curve,
the embedded data, file size, escaping and bad input (the page itself is tested in headless
Chromium in tests/browser; pages written by `discover` and `circuitctl view` in tests/cli)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from viewer_records import GOLDEN, GOLDEN_KINDS, HOSTILE, check_payload, golden, gpt2_small_record, gqa_record, hostile_payload

from circuitctl.errors import UsageError
from circuitctl.viewer import payload_from_record, refresh_viewer, render_html, write_viewer
from circuitctl.viewer.page import compact


def embedded(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', html, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


@pytest.mark.parametrize("name", sorted(GOLDEN_KINDS))
def test_version_1_files_render_through_the_upgrade(name):
    record, faithfulness = golden(name)
    assert record["schema_version"] == 2 and record["space"]["kind"] == GOLDEN_KINDS[name]
    check_payload(record, faithfulness, payload_from_record(record, faithfulness))


def test_kv_groups_feed_their_heads():
    nodes = {n["id"]: n for n in payload_from_record(gqa_record())["nodes"]}
    assert nodes["a0.g0"]["kind"] == "kv_group" and nodes["a0.g0"]["feeds"] == ["a0.h0", "a0.h1"]
    assert nodes["a0.g1"]["feeds"] == ["a0.h2", "a0.h3"] and nodes["a0.g0"]["layer"] == 0


def test_faithfulness_curve_is_the_reports_sizes_and_values():
    record, _ = golden("demo")
    report = {"faithfulness": 0.9, "completeness": 0.01, "curve_sizes": [1, 2, 11, 110], "percentages": [0.1, 1, 10, 100],
              "curve_signed": [0.0, None, 0.5, 1.0], "curve_absolute": [0.1, 0.2, 0.6, 1.0], "cpr": 0.4, "cmd": 0.2}
    curve = payload_from_record(record, report)["faithfulness"]
    assert curve["x"] == [1, 2, 11, 110] and curve["percentages"] == [0.1, 1, 10, 100]
    assert curve["curve_signed"] == [0.0, None, 0.5, 1.0] and curve["curve_absolute"] == report["curve_absolute"]
    assert (curve["cpr"], curve["cmd"], curve["faithfulness"], curve["undefined"]) == (0.4, 0.2, 0.9, None)
    # a feature circuit: plain counts, no CPR/CMD; f undefined (the ablation changes nothing)
    undefined = {"faithfulness": None, "completeness": None, "curve_sizes": [1, 5], "percentages": None, "curve_signed": [None, None],
                 "curve_absolute": [None, None], "cpr": None, "cmd": None, "faithfulness_undefined": "m(full) == m(empty)"}
    payload = payload_from_record(golden("sfc")[0], undefined)
    curve = payload["faithfulness"]
    assert curve["x"] == [1, 5] and curve["percentages"] is None and curve["cpr"] is None and curve["faithfulness"] is None
    assert curve["undefined"] == "m(full) == m(empty)" and payload["title"].endswith("| f = undefined")
    # a report written before schema 2 (no curve_sizes): its numbers, no curve
    record, old = golden("demo")
    curve = payload_from_record(record, old)["faithfulness"]
    assert curve["x"] is None and curve["faithfulness"] == old["faithfulness"] and curve["cpr"] == old["cpr"]


def test_titles_name_task_method_sweep_point_units_and_f():
    assert payload_from_record(*golden("demo"))["title"] == "toy-ioi | eap | 39 edges | f = 0.895"
    record, _ = golden("acdc_sweep/tau-0.01")
    assert payload_from_record(record)["title"].startswith("layernorm_mlp | acdc tau=0.01 | ")
    record, _ = golden("sfc")
    payload = payload_from_record(record)
    assert payload["title"].startswith("mlp_neurons | sfc | 29 features | f = ")
    assert payload["circuit"]["selection_rule"] == "features with |effect| > 0.1; edges with |effect| > 0.01"


def test_explanation_roles_label_nodes():
    record, _ = golden("pos_node")
    explanation = {"nodes": {"a1.h1": {"roles": [{"role": "mover", "score": 0.9}, {"role": "copy", "score": 0.7}]}}, "groups": []}
    nodes = {n["id"]: n for n in payload_from_record(record, None, explanation)["nodes"]}
    assert nodes["a1.h1@end"]["label"] == "mover, copy" and nodes["a1.h0@end"]["label"] is None


def test_page_embeds_the_payload_compactly_and_inertly():
    payload = hostile_payload()
    html = render_html(payload)
    assert embedded(html) == json.loads(json.dumps(compact(payload)))
    assert html.count("</script") == 2 and "<!--" not in html  # the two closing tags of the template
    assert "<script>alert" not in html and "<img" not in html
    assert not re.search(r"\b(src|href)\s*=\s*[\"']?(https?:)?//", html)  # nothing to fetch
    assert "default-src 'none'" in html


def test_gpt2_sized_page_stays_under_5_mb():
    html = render_html(payload_from_record(gpt2_small_record()))
    data = embedded(html)
    assert len(data["edges"]["s"]) == 32491
    assert len(html.encode()) < 5_000_000


def test_large_spaces_keep_the_circuit_and_the_strongest_units(monkeypatch):
    from circuitctl.viewer import payload as payload_module

    record = gpt2_small_record(n_in_circuit=50)
    monkeypatch.setattr(payload_module, "MAX_EDGES", 1000)
    payload = payload_from_record(record)
    kept = {e["source"] + "->" + e["input"] for e in payload["edges"]}
    strongest = sorted(record["edges"], key=lambda e: -abs(record["edges"][e]["score"]))[:1000]
    assert kept == set(strongest) and payload["circuit"]["n_total"] == 32491 and payload["circuit"]["n_in_circuit"] == 50
    assert [e for e in record["edges"] if e in kept] == [e["source"] + "->" + e["input"] for e in payload["edges"]]  # order kept
    neurons = {f"m{layer}.n{i}": {"score": (i % 97) / 97 - 0.5, "in_graph": i == 48} for layer in range(2) for i in range(3072)}
    record, _ = golden("neuron")
    record = {**record, "neurons": neurons, "results": {**record["results"], "n_neurons_total": 6144}}
    payload = payload_from_record(record)
    assert len(payload["nodes"]) == payload_module.MAX_NODE_UNITS and payload["circuit"]["n_total"] == 6144
    assert {"m0.n48", "m1.n48"} <= {n["id"] for n in payload["nodes"]}  # the circuit, though weak (|score| 0.005), stays


def test_records_other_than_schema_2_are_refused():
    record, _ = golden("demo")
    raw = json.loads((GOLDEN / "demo" / "circuit.json").read_text())  # version 1, not upgraded
    for bad in ([], {"nodes": {}}, raw, {**record, "schema_version": 99}, {**record, "space": {"kind": "circle"}}, {**record, "edges": []}):
        with pytest.raises(UsageError):
            payload_from_record(bad)
    with pytest.raises(UsageError, match="nonsense"):
        payload_from_record({**record, "edges": {"nonsense": {"score": 1.0, "in_graph": True}}})


def copy_run(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name.replace("/", "_")
    shutil.copytree(GOLDEN / name, run)
    return run


@pytest.mark.parametrize("name", sorted(GOLDEN_KINDS))
def test_write_viewer_handles_every_kind(tmp_path, name):
    run = copy_run(name, tmp_path)
    page = write_viewer(run)
    assert page == run / "circuit.html" and embedded(page.read_text())["meta"]["kind"] == GOLDEN_KINDS[name]


def test_a_mib_file_renders_as_an_edge_circuit(tmp_path):
    (tmp_path / "circuit.json").write_text((GOLDEN / "demo" / "circuit.mib.json").read_text())
    data = embedded(write_viewer(tmp_path).read_text())
    assert data["meta"]["kind"] == "edge" and len(data["edges"]["s"]) == 110 and sum(data["edges"]["m"]) == 39


def test_bad_run_directories_are_usage_errors_that_keep_the_earlier_page(tmp_path):
    run = copy_run("demo", tmp_path)
    write_viewer(run)
    before = (run / "circuit.html").read_bytes()
    (run / "faithfulness.json").write_text("{not json")
    other = tmp_path / "other"
    other.mkdir()
    (other / "circuit.json").write_text(json.dumps({"something": 1}))
    named = tmp_path / "named"
    named.mkdir()
    record = json.loads((GOLDEN / "demo" / "circuit.json").read_text())
    (named / "circuit.json").write_text(json.dumps({**record, "edges": {"input->x9": {"score": 1.0, "in_graph": True}}}))
    cases = [
        (tmp_path / "missing", "does not exist"),
        (run / "circuit.json", "not a run directory"),
        (GOLDEN / "acdc_sweep", "tau-0.01"),
        (run, "faithfulness.json"),
        (other, "not a circuit file"),
        (named, "input->x9"),
    ]
    for path, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            write_viewer(path)
        page, note = refresh_viewer(path)
        assert page is None and message in note and "circuit.html was not written" in note
    assert (run / "circuit.html").read_bytes() == before


def test_viewer_does_not_import_torch():
    code = "import sys, circuitctl.cli.app as a; a._register(); import circuitctl.viewer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_hostile_title_is_escaped_in_the_data():
    html = render_html(hostile_payload())
    assert embedded(html)["meta"]["title"] == HOSTILE
