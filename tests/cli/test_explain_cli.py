"""`circuitctl explain RUN_DIR` end to end: every circuit kind, the files it writes, never
overwriting without --force, clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from circuitctl.errors import UsageError
from explain_helpers import GOLDEN, golden_run

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args, capsys) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    from circuitctl.cli.app import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _explain(run_dir, **kw):
    from circuitctl.explain.pipeline import explain_run

    return explain_run(run_dir, **kw)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def test_cli_writes_the_explanation_and_refuses_to_overwrite(tmp_path, capsys):
    run = golden_run(tmp_path, "acdc")  # planted layernorm_mlp: a0.h0 -> m0 -> a1.h0 (v)
    code, out, err = cli("explain", str(run), capsys=capsys)
    assert code == 0, err
    assert "a1.h0" in out and "explanation.json" in out
    record = json.loads((run / "explanation.json").read_text())
    assert record["schema_version"] == 1 and record["run"]["kind"] == "edge"
    assert set(record) >= {"nodes", "groups", "composition", "probes", "thresholds"}
    entry = record["nodes"]["a1.h0"]
    assert set(entry) >= {"roles", "scores", "attention", "dla", "group"}
    assert entry["dla"]["clean"] == pytest.approx(4.44, abs=0.01)  # the head that writes the answer
    assert record["nodes"]["m0"]["top_neurons"] and record["nodes"]["m0"]["kind"] == "mlp"
    planted = {n["neuron"] for n in record["nodes"]["m0"]["top_neurons"]}
    assert planted <= {f"m0.n{i}" for i in range(8)}  # the planted re-encoding neurons, no distractor neuron
    assert "a0.h0->m0" not in {r["edge"] for r in record["composition"]}  # heads only
    assert "## Heads" in (run / "explanation.md").read_text()
    dot = (run / "circuit.dot").read_text()
    assert dot.count("circuitctl explain: node labels") == 1 and "DLA +4.44" in dot
    assert (run / "circuit.grouped.dot").is_file()
    if shutil.which("dot"):
        assert (run / "circuit.grouped.svg").read_text().lstrip().startswith("<?xml")
    before = _snapshot(run)
    code, _, err = cli("explain", str(run), capsys=capsys)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert _snapshot(run) == before  # nothing touched


def test_force_replaces_the_labels_instead_of_adding_them(tmp_path):
    run = golden_run(tmp_path, "cdt")
    _explain(run)
    first = (run / "circuit.dot").read_text()
    _explain(run, force=True)
    assert (run / "circuit.dot").read_text() == first
    with pytest.raises(UsageError, match="--force"):
        _explain(run)


def test_clear_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        _explain(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no circuit.json"):
        _explain(tmp_path / "empty")
    sweep = golden_run(tmp_path, "acdc_sweep")
    with pytest.raises(UsageError, match="tau-0.01"):
        _explain(sweep)
    broken = golden_run(tmp_path, "node")
    (broken / "circuit.json").write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        _explain(broken)
    other = golden_run(tmp_path, "cdt")
    (other / "circuit.json").write_text('{"nodes": {}}')
    with pytest.raises(UsageError, match="not a circuit file"):
        _explain(other)


def test_a_mib_circuit_file_is_read_as_an_edge_circuit(tmp_path):
    from circuitctl.explain.load import load_run

    run = golden_run(tmp_path, "path_patching")
    (run / "circuit.json").write_text((run / "circuit.mib.json").read_text())
    loaded = load_run(run)
    mib = json.loads((run / "circuit.mib.json").read_text())
    assert loaded.kind == "edge"
    assert set(loaded.edges) == {e for e, v in mib["edges"].items() if v["in_graph"]}
    assert "a1.h1" in loaded.nodes


def test_a_sweep_circuit_reads_its_parents_config(tmp_path):
    summary = _explain(golden_run(tmp_path, "acdc_sweep") / "tau-0.01")
    assert "a1.h0" in summary.nodes


@pytest.mark.parametrize("name", ["node", "pos_node", "pos_edge", "path_patching"])
def test_node_and_per_position_circuits(tmp_path, name):
    run = golden_run(tmp_path, name)
    summary = _explain(run)
    record = json.loads((run / "explanation.json").read_text())
    heads = {n: e for n, e in record["nodes"].items() if e["kind"] == "head"}
    assert heads and all(e["dla"] is not None and "group" in e for e in heads.values())
    dot = (run / "circuit.dot").read_text()
    if name.startswith("pos"):
        assert record["nodes"]["a1.h1"]["positions"] == ["end"]
        assert '"a1.h1@end" [label="a1.h1\\n@end\\nnegative_mover->S2' in dot
        assert '"g1@end"' in (run / "circuit.grouped.dot").read_text()
        assert record["nodes"]["a0.h3"]["attention"]["query"] == "S2"  # in the circuit at S2 only
    if name != "node":  # toy IOI circuits
        groups = [g for g in record["groups"] if g["role"] == "negative_mover"]
        assert groups and groups[0]["target"] == "S2"
    assert summary.files[:2] == ["explanation.json", "explanation.md"]


def test_neuron_circuit(tmp_path):
    run = golden_run(tmp_path, "neuron")
    dot_before = (run / "circuit.dot").read_text()
    _explain(run)
    record = json.loads((run / "explanation.json").read_text())
    m0 = record["nodes"]["m0"]
    assert set(m0["circuit_neurons"]) >= {"m0.n3", "m0.n7"}  # the planted neurons
    assert m0["dla"]["clean"] == pytest.approx(4.0, abs=1e-4)
    assert (run / "circuit.dot").read_text() == dot_before  # drawn neuron by neuron: left alone


def test_feature_circuit_gets_top_tokens_and_direct_logit_attribution(tmp_path):
    """Each feature's DLA against a plain computation from the SAE and the model."""
    from circuitctl.config.load import load_config
    from circuitctl.sae.sae import load_sae
    from circuitctl.session import open_session

    run = golden_run(tmp_path, "sfc")
    _explain(run)
    record = json.loads((run / "explanation.json").read_text())
    circuit = json.loads((run / "circuit.json").read_text())
    features = {n: e for n, e in circuit["nodes"].items() if e.get("in_graph") and "/f" in n}
    assert set(record["nodes"]) == set(features)
    name = max(features, key=lambda n: abs(features[n]["score"]))
    entry = record["nodes"][name]
    assert entry["top_tokens"] == features[name]["label"]
    # reference: the feature's activation at the answer position times its decoder row, read by
    # the unembedding (the planted model has no normalisation) as answer minus wrong answer
    session = open_session(load_config(run / "config.yaml"), run)
    model, data = session.adapter.model, session.data
    site, index = name.split("/")[0], int(name.split("/f")[1])
    sae = load_sae(GOLDEN / "saes" / site)
    hook = {"resid0": "blocks.0.hook_resid_post", "mlp0": "blocks.0.hook_mlp_out", "attn0": "blocks.0.hook_attn_out"}[site]
    _, cache = model.run_with_cache(data.clean, names_filter=hook)
    rows = torch.arange(data.n)
    acts = sae.encode(cache[hook][rows, data.answer_positions])[:, index]
    direction = model.W_U[:, data.answers[:, 0]] - model.W_U[:, data.wrong[:, 0]]  # [d, N]
    expected = (acts * (sae.decoder_matrix()[index] @ direction)).mean()
    assert entry["dla"]["clean"] == pytest.approx(float(expected), rel=1e-3, abs=1e-5)


def test_config_explain_flag_does_not_change_the_experiment_hash(tmp_path):
    from circuitctl.config.load import config_hash, load_config

    config = load_config(golden_run(tmp_path, "demo") / "config.yaml")
    assert config.explain is True
    assert config_hash(config.model_copy(update={"explain": False})) == config_hash(config)
    # the hash of the config's dump as if the field did not exist (nor the other sections that
    # change no result: output, checks, cache_gib)
    dump = {k: v for k, v in config.to_plain().items() if k not in ("output", "explain", "checks", "cache_gib")}
    canonical = json.dumps(dump, sort_keys=True, separators=(",", ":"))
    assert config_hash(config) == hashlib.sha256(canonical.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    "name, kind, nodes",
    [
        ("demo", "edge", {"a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0", "a1.h0", "a1.h1", "a1.h3", "m1"}),
        ("node", "node", {"a0.h0", "m0", "a1.h0", "m1"}),
        ("neuron", "neuron", {"m0"}),
        ("pos_node", "positional_node", None),
        ("pos_edge", "positional_edge", None),
        ("sfc", "feature", None),
    ],
)
def test_load_run_reads_every_circuit_kind(tmp_path, name, kind, nodes):
    """The one reader of circuit files (the part to swap when the format changes)."""
    import json as _json

    from circuitctl.explain.load import load_run

    run = load_run(golden_run(tmp_path, name))
    assert run.kind == kind and run.config.task.name and run.config_dir == run.run_dir
    record = _json.loads((run.run_dir / "circuit.json").read_text())
    if nodes is not None:
        assert set(run.nodes) == nodes
    if kind.startswith("positional"):
        assert all(n.position for n in run.nodes.values())
        assert run.positions == ["IO", "S1", "S2", "end", "other"]
        assert run.answer_groups == []  # schema 1 does not record it: the pipeline reads it off the task
        assert run.nodes["a1.h1@end"].component == "a1.h1"
    if kind == "feature":
        assert all(n.kind == "feature" and n.label for n in run.nodes.values())
    in_graph = {e for e, v in record["edges"].items() if v["in_graph"]}
    assert set(run.edges) == in_graph
    if kind == "neuron":
        assert set(run.neurons) == {n for n, v in record["neurons"].items() if v["in_graph"]}


def test_explain_discovered_explains_every_circuit_of_a_sweep(tmp_path):
    from circuitctl.config.load import load_config
    from circuitctl.explain.pipeline import explain_discovered
    from circuitctl.session import open_session

    sweep = golden_run(tmp_path, "acdc_sweep")
    session = open_session(load_config(sweep / "config.yaml"), sweep)
    files, notes = explain_discovered(sweep, session)
    assert "tau-0.01/explanation.json" in files and (sweep / "tau-0.01" / "explanation.md").is_file()
    files, _ = explain_discovered(sweep, session)  # a --force rerun of discover replaces it
    assert "tau-0.01/explanation.json" in files


def _discover_planted_per_token(directory, explain: bool, force: bool = False):
    """discover on the planted induction model with per-token EAP-IG (a schema-2 per-position
    circuit over t0 .. t5, end), explained at the end of discover unless `explain` is false."""
    import yaml

    from circuitctl.config.load import load_config
    from circuitctl.resources import SHIPPED_MODELS
    from circuitctl.runner import discover

    config = {
        "model": {"path": str(SHIPPED_MODELS / "planted-induction"), "device": "cpu"},
        "task": {"name": "planted-induction"},
        "method": {"name": "eap_ig", "positions": "per_token", "steps": 2},
        "selection": {"top_n": 12},
        "output": {"dir": str(directory)},
        "explain": explain,
    }
    path = directory.parent / f"{directory.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return discover(load_config(path), path.parent, force=force)


def test_discover_explains_its_circuit_by_default(tmp_path):
    from circuitctl.explain.drawing import BEGIN
    from circuitctl.explain.load import load_run

    summary = _discover_planted_per_token(tmp_path / "explained", explain=True)
    run = tmp_path / "explained"
    assert {"explanation.json", "explanation.md", "circuit.grouped.dot"} <= set(summary.files)
    assert "explain" in summary.seconds
    loaded = load_run(run)
    assert loaded.kind == "positional_edge" and loaded.answer_groups == ["end"]  # schema 2 records it
    assert loaded.positions == ["t0", "t1", "t2", "t3", "t4", "t5", "end"]
    nodes = json.loads((run / "explanation.json").read_text())["nodes"]
    assert nodes["a1.h0"]["positions"] == ["end"] and nodes["a1.h0"]["roles"][0]["role"] == "induction"
    assert [r["role"] for r in nodes["a0.h0"]["roles"]] == ["previous_token"]
    assert _page_explanation(run)["nodes"]["a1.h0"]["roles"][0]["role"] == "induction"  # the viewer shows it
    # explain only adds a label block to the drawing discover wrote; a --force rerun without
    # explain leaves no explanation of the earlier circuit behind
    labelled = (run / "circuit.dot").read_text()
    summary = _discover_planted_per_token(run, explain=False, force=True)
    assert "explain" not in summary.seconds
    assert not [p.name for p in run.iterdir() if p.name.startswith(("explanation", "circuit.grouped"))]
    assert BEGIN in labelled and labelled.split(BEGIN)[0] == (run / "circuit.dot").read_text().rpartition("}")[0]
    assert _page_explanation(run) is None
    # `circuitctl explain` afterwards rewrites the run's page with the explanation
    assert "circuit.html" in _explain(run).files
    assert _page_explanation(run)["nodes"]["a0.h0"]["roles"][0]["role"] == "previous_token"


def _page_explanation(run):
    """The explanation embedded in the run's circuit.html (None when it has none)."""
    import re

    html = (run / "circuit.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="circuit-data">(.*?)</script>', html, re.S).group(1))
    return data["meta"]["explanation"]


def test_an_explanation_failure_never_fails_the_discovery(tmp_path, monkeypatch):
    import circuitctl.explain.pipeline as pipeline

    def broken(run_dir, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(pipeline, "explain_run", broken)
    summary = _discover_planted_per_token(tmp_path / "run", explain=True)
    assert (tmp_path / "run" / "circuit.json").is_file() and summary.faithfulness is not None
    assert any("not explained" in note and "probe exploded" in note for note in summary.notes)
    assert not (tmp_path / "run" / "explanation.json").exists()


def test_discover_explains_every_circuit_of_a_sweep(tmp_path):
    from circuitctl.config.load import load_config
    from circuitctl.runner import discover

    source = golden_run(tmp_path, "acdc_sweep")  # its config: ACDC with tau [0.01, 0.1]
    run = tmp_path / "run"
    summary = discover(load_config(source / "config.yaml", [f"output.dir={run}"]), source)
    for label in ("tau-0.01", "tau-0.1"):
        record = json.loads((run / label / "explanation.json").read_text())
        assert record["nodes"]["a1.h0"]["dla"]["clean"] == pytest.approx(4.44, abs=0.01)
    assert not any("explain" in note for note in summary.notes), summary.notes
