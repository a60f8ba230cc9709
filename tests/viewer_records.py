"""Inputs for the viewer tests: the golden run directories, a GPT-2-small-sized synthetic
circuit record and a payload full of hostile names; plus the top-n ranking computed in Python."""

from __future__ import annotations

import json
import random
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden" / "v1"
HOSTILE = "<script>alert(1)</script>\"quoted\" 'single' </script><!-- & \n new line"


def golden(name: str) -> tuple[dict, dict | None]:
    """(circuit.json record, faithfulness.json or None) of a golden run directory."""
    run = GOLDEN / name
    faithfulness = run / "faithfulness.json"
    return json.loads((run / "circuit.json").read_text()), (json.loads(faithfulness.read_text()) if faithfulness.is_file() else None)


def top_n(record: dict, n: int, absolute: bool = True) -> list[str]:
    """The n highest-scoring edges of a record (ties in record order, as the page breaks them)."""
    scored = [(name, entry["score"]) for name, entry in record["edges"].items() if entry["score"] is not None]
    ranked = sorted(scored, key=lambda item: -abs(item[1]) if absolute else -item[1])
    return [name for name, _ in ranked[:n]]


def gpt2_small_record(seed: int = 0, n_in_circuit: int = 300) -> dict:
    """A schema-1 edge circuit with GPT-2 small's graph (12 layers x 12 heads, MLPs): 157 upstream
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
        "schema_version": 1, "format": "circuitctl.circuit",
        "model": {"n_layers": n_layers, "n_heads": n_heads}, "task": {"name": "synthetic"}, "method": {"name": "random"},
        "selection": {"top_n": n_in_circuit, "absolute": True, "prune": False},
        "results": {"n_edges_total": len(edges), "n_edges_in_circuit": n_in_circuit},
        "graph": {"n_layers": n_layers, "n_heads": n_heads, "has_mlps": True, "parallel_attn_mlp": False},
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
        "schema_version": 1, "format": "circuitctl.circuit", "model": {"n_layers": 1}, "task": {"name": "gqa"}, "method": {"name": "eap"},
        "selection": {"top_n": 4, "absolute": True, "prune": True}, "results": {"n_edges_in_circuit": 3},
        "graph": {"n_layers": 1, "n_heads": 4, "has_mlps": False, "parallel_attn_mlp": False},
        "nodes": {name: {"in_graph": True, "score": None} for name in upstream + ["logits"]},
        "edges": {name: {"score": score, "in_graph": name in ("input->a0.h1<q>", "input->a0.g0<k>", "a0.h1->logits")} for name, score in edges.items()},
    }
