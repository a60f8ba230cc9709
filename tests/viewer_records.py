"""Inputs for the viewer tests: the golden version-1 run directories (read through
`load_circuit_file`, as the viewer reads them), schema-2 run directories written by `discover`
on the shipped planted models, a GPT-2-small-sized synthetic circuit record and a payload full
of hostile names; plus the top-n ranking computed in Python and the payload checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "v1"
HOSTILE = "<script>alert(1)</script>\"quoted\" 'single' </script><!-- & \n new line"
# golden run directory: its kind of circuit
GOLDEN_KINDS = {"demo": "edge", "acdc": "edge", "cdt": "edge", "path_patching": "edge", "acdc_sweep/tau-0.01": "edge",
                "node": "node", "neuron": "neuron", "pos_edge": "positional_edge", "pos_node": "positional_node", "sfc": "feature"}
UNIT = {"edge": "edges", "positional_edge": "edges", "node": "nodes", "positional_node": "nodes", "neuron": "neurons", "feature": "features"}


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def golden(name: str) -> tuple[dict, dict | None]:
    """(the schema-2 record of a golden run directory's circuit.json, its faithfulness.json or None)."""
    from circuitctl.circuits.record import load_circuit_file

    run = GOLDEN / name
    return load_circuit_file(run / "circuit.json").record, read_json(run / "faithfulness.json")


# Schema-2 run directories: name -> (shipped config, overrides, evaluate faithfulness beside the circuit)
_PLANTED_NEURONS = ["model.path=models/planted-mlp-neurons", "task.name=planted-mlp-neurons"]
SCHEMA2_RUNS = {
    "edge": ("planted-layernorm-mlp-eap", [], True),
    "pos_edge": ("planted-layernorm-mlp-eap", ["method.name=eap_ig", "method.positions=per_token"], False),
    "neuron": ("planted-layernorm-mlp-eap", ["method.name=eap_ig", "method.granularity=neuron", *_PLANTED_NEURONS], False),
    "sfc": ("planted-layernorm-mlp-eap", ["method.name=sfc", f"method.saes={GOLDEN / 'saes'}", "method.steps=2", "method.node_threshold=0.1",
                                          "method.edge_threshold=0.01", *_PLANTED_NEURONS], True),
    "acdc_sweep": ("planted-layernorm-mlp-eap", ["method.name=acdc", "method.tau=[0.01,0.1]"], False),
}
SCHEMA2_KINDS = {"edge": "edge", "pos_edge": "positional_edge", "neuron": "neuron", "sfc": "feature", "acdc_sweep/tau-0.01": "edge",
                 "acdc_sweep/tau-0.1": "edge"}
_RUNS: dict[Path, tuple[Path, dict]] = {}


def schema2_runs(tmp_path_factory) -> tuple[Path, dict]:
    """(root, {name: {"discover": its DiscoverySummary, "evaluate": {"files", "notes"} or None}}) of SCHEMA2_RUNS, written once per test session by
    `discover` in this process (a few seconds on the planted models), then evaluated beside the
    circuit where asked (which rewrites circuit.html with the curve)."""
    from circuitctl.batching import collect_notes
    from circuitctl.config.load import load_config
    from circuitctl.evaluation import evaluate_faithfulness
    from circuitctl.resources import shipped_config
    from circuitctl.runner import discover

    base = tmp_path_factory.getbasetemp()
    if base not in _RUNS:
        root = base / "viewer-schema2-runs"
        summaries = {}
        for name, (config_name, overrides, evaluate) in SCHEMA2_RUNS.items():
            config_file = shipped_config(config_name)
            config = load_config(config_file, [*overrides, f"output.dir={root / name}"])
            summaries[name] = {"discover": discover(config, config_file.parent), "evaluate": None}
            if evaluate:
                with collect_notes() as notes:
                    _, files = evaluate_faithfulness(root / name, config, config_file.parent, root / name)
                summaries[name]["evaluate"] = {"files": files, "notes": notes}
        _RUNS[base] = root, summaries
    return _RUNS[base]


def units(record: dict) -> dict[str, dict]:
    """The entries the circuit is made of: edges, nodes (scored ones), neurons or features."""
    kind = record["space"]["kind"]
    if kind == "neuron":
        return record["neurons"]
    if UNIT[kind] == "edges":
        return record["edges"]
    return {name: entry for name, entry in record["nodes"].items() if entry["score"] is not None}


def check_payload(record: dict, faithfulness: dict | None, payload: dict) -> None:
    """The payload shows the record: every unit with its score and membership, the counts the
    run recorded, position columns and error nodes."""
    kind = record["space"]["kind"]
    assert payload["format"] == "circuitctl.view" and payload["kind"] == kind
    circuit, results = payload["circuit"], record["results"]
    unit = UNIT[kind]
    assert circuit["unit"] == unit
    assert circuit["n_in_circuit"] == results[f"n_{unit}_in_circuit"] == sum(e["in_graph"] for e in units(record).values())
    ids = [n["id"] for n in payload["nodes"]]
    assert len(ids) == len(set(ids))
    if kind == "neuron":
        assert ids == list(record["neurons"]) and circuit["n_total"] == len(record["neurons"])
        assert [n["score"] for n in payload["nodes"]] == [e["score"] for e in record["neurons"].values()]
    else:
        assert set(record["nodes"]) <= set(ids)
        by_id = {n["id"]: n for n in payload["nodes"]}
        node_scores = results.get("node_scores") or {}  # CD-T records node relevances beside its edge scores
        for name, entry in record["nodes"].items():
            assert by_id[name]["score"] == (entry["score"] if entry["score"] is not None else node_scores.get(name)), name
    edges = {e["source"] + "->" + e["input"]: e for e in payload["edges"]}
    assert set(edges) == set(record["edges"])
    for name, entry in record["edges"].items():
        assert edges[name]["score"] == entry["score"] and edges[name]["in_circuit"] == entry["in_graph"]
        assert edges[name]["target"] in ids and edges[name]["source"] in ids
    positions = record["space"].get("positions")
    if positions:
        assert payload["columns"] == positions["names"]
        assert all(n["column"] == n["id"].split("@")[1] for n in payload["nodes"])
    else:
        assert payload["columns"] is None
    if kind == "feature":
        errors = {name for name in record["nodes"] if name.endswith("/err")}
        assert errors and {n["id"] for n in payload["nodes"] if n["kind"] == "error"} == errors
        labelled = [name for name, entry in record["nodes"].items() if entry.get("label")]
        assert labelled and all(by_id[name]["label"] == record["nodes"][name]["label"] for name in labelled)
    assert (payload["faithfulness"] is None) == (faithfulness is None)


def top_n(record: dict, n: int, absolute: bool = True) -> list[str]:
    """The n highest-scoring edges of a record (ties in record order, as the page breaks them)."""
    scored = [(name, entry["score"]) for name, entry in record["edges"].items() if entry["score"] is not None]
    ranked = sorted(scored, key=lambda item: -abs(item[1]) if absolute else -item[1])
    return [name for name, _ in ranked[:n]]


def gpt2_small_record(seed: int = 0, n_in_circuit: int = 300) -> dict:
    """A schema-2 edge circuit with GPT-2 small's graph (12 layers x 12 heads, MLPs): 157 upstream
    nodes, 445 downstream inputs, 32,491 scored edges; random scores, the strongest kept."""
    rng = random.Random(seed)
    n_layers, n_heads = 12, 12
    upstream = ["input"]
    edges = {}
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        for channel in "qkv":
            for head in heads:
                for source in upstream:
                    edges[f"{source}->{head}<{channel}>"] = rng.gauss(0, 1) * rng.random() ** 3
        for source in upstream + heads:
            edges[f"{source}->m{layer}"] = rng.gauss(0, 1) * rng.random() ** 3
        upstream = upstream + heads + [f"m{layer}"]
    for source in upstream:
        edges[f"{source}->logits"] = rng.gauss(0, 1) * rng.random() ** 3
    kept = set(sorted(edges, key=lambda e: -abs(edges[e]))[:n_in_circuit])
    nodes = {name: {"in_graph": True, "score": None} for name in upstream + ["logits"]}
    return {
        "schema_version": 2, "format": "circuitctl.circuit",
        "model": {"n_layers": n_layers, "n_heads": n_heads}, "task": {"name": "synthetic"}, "method": {"name": "random"},
        "selection": {"top_n": n_in_circuit, "absolute": True, "prune": False},
        "results": {"n_edges_total": len(edges), "n_edges_in_circuit": n_in_circuit, "unit": "edges"},
        "graph": {"n_layers": n_layers, "n_heads": n_heads, "has_mlps": True, "parallel_attn_mlp": False},
        "space": {"kind": "edge"},
        "nodes": nodes,
        "edges": {name: {"score": score, "in_graph": name in kept} for name, score in edges.items()},
    }


def hostile_payload() -> dict:
    """A per-position payload whose title, position names, labels and explanation are hostile."""
    columns = ["IO", HOSTILE]
    nodes = [
        {"id": "input@IO", "kind": "input", "layer": -1, "column": "IO", "score": None, "in_circuit": True, "label": None},
        {"id": f"a0.h0@{HOSTILE}", "kind": "head", "layer": 0, "column": HOSTILE, "score": 1.5, "in_circuit": True,
         "label": "<img src=x onerror=alert(2)>"},
        {"id": f"logits@{HOSTILE}", "kind": "logits", "layer": 1, "column": HOSTILE, "score": None, "in_circuit": True, "label": None},
    ]
    edges = [
        {"source": "input@IO", "target": f"a0.h0@{HOSTILE}", "input": f"a0.h0@{HOSTILE}<q>", "channel": "q", "score": 0.7, "in_circuit": True},
        {"source": f"a0.h0@{HOSTILE}", "target": f"logits@{HOSTILE}", "input": f"logits@{HOSTILE}", "channel": None, "score": -0.4, "in_circuit": True},
    ]
    explanation = {"nodes": {"a0.h0": {"roles": [{"role": HOSTILE, "score": 0.9, "probe": "<b>x</b>"}], "dla": {HOSTILE: 1.0}}},
                   "groups": [{"id": "g1", "name": HOSTILE, "members": ["a0.h0"]}]}
    return {
        "format": "circuitctl.view", "version": 1, "title": HOSTILE, "kind": "positional_edge", "ranked": "edges",
        "n_layers": 1, "columns": columns, "nodes": nodes, "edges": edges,
        "circuit": {"unit": "edges", "n_in_circuit": 2, "n_total": 2, "selection_rule": HOSTILE},
        "explanation": explanation, "faithfulness": None,
    }


def gqa_record() -> dict:
    """A one-layer grouped-query-attention circuit (4 heads, 2 KV groups): input feeds the keys
    of group a0.g0, whose head a0.h1 writes to the logits."""
    upstream = ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3"]
    edges = {"input->a0.h1<q>": 0.5, "input->a0.g0<k>": 0.9, "input->a0.g1<v>": 0.05, "a0.h1->logits": 0.8, "a0.h3->logits": 0.1,
             "input->logits": 0.01}
    return {
        "schema_version": 2, "format": "circuitctl.circuit", "model": {"n_layers": 1}, "task": {"name": "gqa"}, "method": {"name": "eap"},
        "selection": {"top_n": 4, "absolute": True, "prune": True}, "results": {"n_edges_in_circuit": 3},
        "graph": {"n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "has_mlps": False, "parallel_attn_mlp": False}, "space": {"kind": "edge"},
        "nodes": {name: {"in_graph": True, "score": None} for name in upstream + ["logits"]},
        "edges": {name: {"score": score, "in_graph": name in ("input->a0.h1<q>", "input->a0.g0<k>", "a0.h1->logits")} for name, score in edges.items()},
    }
