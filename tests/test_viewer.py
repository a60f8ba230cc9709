"""The viewer without a browser: payloads of every circuit kind against their circuit files,
the embedded data, file size, escaping, and `circuitctl view` (the page itself is tested in
headless Chromium in tests/browser)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from viewer_records import GOLDEN, HOSTILE, golden, gpt2_small_record, gqa_record, hostile_payload

from circuitctl.errors import UsageError
from circuitctl.viewer import payload_from_record, render_html, write_viewer
from circuitctl.viewer.page import compact

KINDS = {"demo": "edge", "acdc": "edge", "cdt": "edge", "path_patching": "edge", "acdc_sweep/tau-0.01": "edge",
         "node": "node", "neuron": "neuron", "pos_edge": "positional_edge", "pos_node": "positional_node", "sfc": "feature"}


def embedded(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', html, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_payload_matches_the_circuit_file(name):
    record, faithfulness = golden(name)
    payload = payload_from_record(record, faithfulness)
    assert payload["format"] == "circuitctl.view" and payload["kind"] == KINDS[name]
    results, circuit = record["results"], payload["circuit"]
    unit = circuit["unit"]
    counted = {"edges": "n_edges_in_circuit", "nodes": "n_nodes_in_circuit"}[unit] if payload["kind"] != "neuron" else "n_neurons_in_circuit"
    assert circuit["n_in_circuit"] == results[counted]
    ids = [n["id"] for n in payload["nodes"]]
    assert len(ids) == len(set(ids))
    if payload["kind"] == "neuron":
        assert ids == list(record["neurons"]) and circuit["n_total"] == results["n_neurons_total"]
    else:
        assert set(record["nodes"]) <= set(ids)
    edges = {e["source"] + "->" + e["input"]: e for e in payload["edges"]}
    assert set(edges) == set(record["edges"])
    for name_, entry in record["edges"].items():
        assert edges[name_]["score"] == entry["score"] and edges[name_]["in_circuit"] == entry["in_graph"]
        assert edges[name_]["target"] in ids and edges[name_]["source"] in ids
    if "positions" in record:
        assert payload["columns"] == record["positions"]["names"]
        assert all(n["column"] == n["id"].split("@")[1] for n in payload["nodes"])
    if payload["kind"] == "feature":
        assert {n["id"] for n in payload["nodes"] if n["kind"] == "error"} == {"attn0/err", "mlp0/err", "resid0/err"}
        assert payload["nodes"][0]["label"] == record["nodes"][payload["nodes"][0]["id"]]["label"]
    assert (payload["faithfulness"] is None) == (faithfulness is None)


def test_kv_groups_feed_their_heads():
    nodes = {n["id"]: n for n in payload_from_record(gqa_record())["nodes"]}
    assert nodes["a0.g0"]["kind"] == "kv_group" and nodes["a0.g0"]["feeds"] == ["a0.h0", "a0.h1"]
    assert nodes["a0.g1"]["feeds"] == ["a0.h2", "a0.h3"] and nodes["a0.g0"]["layer"] == 0


def test_faithfulness_curve_points_count_units_as_the_evaluation_does():
    from circuitctl.metrics.faithfulness import n_edges_for_percentage

    record, faithfulness = golden("demo")
    curve = payload_from_record(record, faithfulness)["faithfulness"]
    assert curve["x"] == [n_edges_for_percentage(p, 110) for p in faithfulness["percentages"]]
    assert curve["curve_signed"] == faithfulness["curve_signed"] and curve["cpr"] == faithfulness["cpr"]
    record, faithfulness = golden("sfc")
    curve = payload_from_record(record, faithfulness)["faithfulness"]
    assert curve["x"] == faithfulness["curve_n_nodes"] and curve["curve_absolute"] == faithfulness["curve_faithfulness"]


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
    payload = payload_from_record({**record, "neurons": neurons})
    assert len(payload["nodes"]) == payload_module.MAX_NODE_UNITS and payload["circuit"]["n_total"] == 6144
    assert {"m0.n48", "m1.n48"} <= {n["id"] for n in payload["nodes"]}  # the circuit, though weak (|score| 0.005), stays


def test_bad_records_are_usage_errors():
    record, _ = golden("demo")
    for bad in ([], {"nodes": {}}, {**record, "format": "something"}, {"cfg": {}, "nodes": {}, "edges": {}}, {**record, "schema_version": 99}):
        with pytest.raises(UsageError):
            payload_from_record(bad)
    with pytest.raises(UsageError, match="malformed"):
        payload_from_record({**record, "edges": {"nonsense": {"score": 1.0, "in_graph": True}}})


def cli(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "circuitctl", *args], capture_output=True, text=True, env=full_env, timeout=120)


def copy_run(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name.replace("/", "_")
    shutil.copytree(GOLDEN / name, run)
    return run


def test_view_command_writes_circuit_html(tmp_path):
    run = copy_run("demo", tmp_path)
    result = cli("view", str(run), env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    page = run / "circuit.html"
    data = embedded(page.read_text())
    assert data["meta"]["title"] == "toy-ioi | eap | 39 edges | f = 0.895" and data["meta"]["faithfulness"]["cpr"] > 0
    result = cli("view", str(run), "--open", env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert result.returncode == 0 and "no browser available" in result.stdout


@pytest.mark.parametrize("name", sorted(KINDS))
def test_write_viewer_handles_every_kind(tmp_path, name):
    run = copy_run(name, tmp_path)
    page = write_viewer(run)
    assert page == run / "circuit.html" and embedded(page.read_text())["meta"]["kind"] == KINDS[name]


def test_view_rejects_bad_input_and_keeps_the_earlier_page(tmp_path):
    run = copy_run("demo", tmp_path)
    write_viewer(run)
    before = (run / "circuit.html").read_bytes()
    (run / "faithfulness.json").write_text("{not json")
    cases = [
        (tmp_path / "missing", "does not exist"),
        (run / "circuit.json", "not a run directory"),
        (GOLDEN / "acdc_sweep", "tau-0.01"),
        (run, "faithfulness.json"),
    ]
    for path, message in cases:
        result = cli("view", str(path))
        assert result.returncode == 2, (path, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert (run / "circuit.html").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "circuit.json").write_text(json.dumps({"cfg": {}, "nodes": {}, "edges": {}}))
    result = cli("view", str(other))
    assert result.returncode == 2 and "not a circuitctl circuit file" in result.stderr


def test_viewer_and_view_command_do_not_import_torch():
    code = "import sys, circuitctl.cli.app as a; a._register(); import circuitctl.viewer; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_hostile_title_is_escaped_in_the_data():
    html = render_html(hostile_payload())
    assert embedded(html)["meta"]["title"] == HOSTILE
