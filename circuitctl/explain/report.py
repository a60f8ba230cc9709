"""explanation.json and explanation.md.

explanation.json (schema_version 1):

    {"schema_version": 1, "format": "circuitctl.explanation",
     "run": {"dir", "kind", "model", "task", "method", "metric", "config_hash"},
     "nodes": {"a1.h2": {"kind": "head",
                         "roles": [{"role": "induction", "score": 0.97, "probe": "repeated_random"}],
                         "scores": {every role score},
                         "attention": {"query", "top_target", "top_attention",
                                       "from": {"answer": {"clean": {target: mean}, "corrupt": {...},
                                                           "entropy": {"clean", "corrupt"}}, "<label>": ...}},
                         "dla": {"clean", "corrupt", "difference"}, "group": "g1"},
               "m0": {"kind": "mlp", "dla": {...}, "top_neurons": [{"neuron", "attribution", "dla"}], "group"},
               "resid0/f3": {"kind": "feature", "top_tokens", "activation", "dla", "group"}},
     "groups": [{"id": "g1", "name": "negative_mover->S2 (+): a1.h1, a1.h3", "members": [...],
                 "role", "target", "dla_sign", "dla_clean"}],
     "composition": [{"edge": "a0.h1->a1.h2<k>", "kind": "K", "score", "percentile",
                      "layer_distance", "pairs_compared", "edge_score"}],
     "probes": {...}, "thresholds": {role: threshold}}
"""

from __future__ import annotations

from pathlib import Path

from circuitctl.explain.load import LoadedRun
from circuitctl.io.escape import html_text
from circuitctl.io.files import write_atomic, write_json

SCHEMA_VERSION = 1
FORMAT = "circuitctl.explanation"


def full_record(run: LoadedRun, explanation: dict) -> dict:
    info = run.record_info
    return {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "run": {
            "dir": str(run.run_dir),
            "kind": run.kind,
            "model": info.get("model"),
            "task": info.get("task"),
            "method": info.get("method"),
            "metric": info.get("metric"),
            "config_hash": info.get("config_hash"),
        },
        **explanation,
    }


def md(text) -> str:
    """Text safe inside a markdown table cell, still readable as plain text: HTML-escaped, the
    punctuation that would start markup escaped, control characters shown as escapes. Never
    put it in a code span, where the escapes would show."""
    out = html_text(text)
    for char in "\\`*_[]|#~":
        out = out.replace(char, "\\" + char)
    return out


def _pairs(mapping: dict) -> str:
    return ", ".join(f"{md(key)}: {md(value)}" for key, value in mapping.items())


def _number(value) -> str:
    return "-" if value is None else f"{value:+.3g}"


def _dla(d: dict) -> str:
    return f"{_number(d['clean'])} / {_number(d['corrupt'])} / {_number(d['difference'])}"


def _roles(entry: dict) -> str:
    listed = entry.get("roles") or []
    if not listed:
        return "-"
    return ", ".join(md(r["role"] + (f"->{r['target']}" if r.get("target") else "")) + f" {r['score']:.2f}" for r in listed)


def to_markdown(record: dict) -> str:
    run, nodes = record["run"], record["nodes"]
    task = (run.get("task") or {}).get("name", "?")
    method = (run.get("method") or {}).get("name", "?")
    lines = [
        f"# Explanation of {md(run['dir'])}",
        "",
        f"Task {md(task)}, method {md(method)}, {md(run['kind'])} circuit. Written by `circuitctl explain`: "
        "roles from synthetic probes and the weights, attention and direct logit attribution (DLA, answer minus "
        "wrong answer at the answer position) from the task's clean and corrupt prompts.",
        "",
    ]
    multi = [g for g in record["groups"] if len(g["members"]) > 1]
    if multi:
        lines += ["## Groups (heads doing the same job)", "", "| group | members | summed DLA |", "|---|---|---|"]
        lines += [f"| {md(g['id'])}: {md(g['name'].split(':')[0])} | {md(', '.join(g['members']))} | {_number(g['dla_clean'])} |" for g in multi]
        lines.append("")
    heads = {n: e for n, e in nodes.items() if e["kind"] == "head"}
    if heads:
        lines += [
            "## Heads",
            "",
            "| head | roles (score) | top target (attention, from) | DLA clean / corrupt / diff | group |",
            "|---|---|---|---|---|",
        ]
        for name, e in heads.items():
            a, d = e["attention"], e["dla"]
            where = md(a["top_target"]) + f" ({a['top_attention']:.2f}, from {md(a['query'])})"
            lines.append(f"| {md(name)} | {_roles(e)} | {where} | {_dla(d)} | {md(e.get('group', '-'))} |")
        lines += ["", "Role scores (all):", "", "| head | " + " | ".join(md(r) for r in next(iter(heads.values()))["scores"]) + " |"]
        lines.append("|---" * (1 + len(next(iter(heads.values()))["scores"])) + "|")
        for name, e in heads.items():
            lines.append(f"| {md(name)} | " + " | ".join(f"{v:.2f}" for v in e["scores"].values()) + " |")
        lines.append("")
    mlps = {n: e for n, e in nodes.items() if e["kind"] == "mlp"}
    if mlps:
        lines += ["## MLPs", "", "| MLP | DLA clean / corrupt / diff | top neurons by attribution (attribution; DLA clean) |", "|---|---|---|"]
        for name, e in mlps.items():
            d = e["dla"]
            neurons = ", ".join(f"{md(n['neuron'])} ({n['attribution']:+.3g}; {n['dla']['clean']:+.3g})" for n in e["top_neurons"])
            lines.append(f"| {md(name)} | {_dla(d)} | {neurons} |")
        lines.append("")
    features = {n: e for n, e in nodes.items() if e["kind"] == "feature"}
    if features:
        lines += ["## Features", "", "| feature | top tokens | activation clean / corrupt | DLA clean / corrupt / diff |", "|---|---|---|---|"]
        for name, e in features.items():
            d, act = e["dla"], e["activation"]
            lines.append(
                f"| {md(name)} | {md(e.get('top_tokens') or '-')} | {act['clean']:.3g} / {act['corrupt']:.3g} | "
                f"{_dla(d)} |"
            )
        lines.append("")
    if record["composition"]:
        lines += [
            "## Composition scores between connected heads",
            "",
            "Percentile: share of all head pairs at the same layer distance with a smaller score of the same kind.",
            "",
            "| edge | kind | score | percentile | edge score |",
            "|---|---|---|---|---|",
        ]
        for row in sorted(record["composition"], key=lambda r: -r["percentile"]):
            lines.append(f"| {md(row['edge'])} | {row['kind']} | {row['score']:.3f} | {row['percentile']:.0f} | {_number(row['edge_score'])} |")
        lines.append("")
    elif heads:
        lines += ["No edge of the circuit runs from one head to another: no composition scores.", ""]
    probes = record["probes"]
    lines += ["## Probes and thresholds", ""]
    rr = probes.get("repeated_random")
    if rr:
        lines.append(f"- previous_token, duplicate_token, induction: repeated random token sequences ({_pairs(rr)})")
    if probes.get("ov"):
        lines.append(f"- copy, negative_copy: OV circuit of each head over probe tokens ({_pairs(probes['ov'])})")
    movable = ", ".join(probes.get("movable_targets") or []) or "none"
    lines.append(f"- mover, negative_mover: clean attention from the answer position to a movable position ({md(movable)}) times (negative) copy")
    lines.append(f"- attention and DLA: the task's first {probes['task']['pairs']} clean and corrupt prompts")
    lines.append("- a role is listed when its score is at least: " + ", ".join(f"{md(k)} {v:g}" for k, v in record["thresholds"].items()))
    return "\n".join(lines) + "\n"


def write_explanation(run: LoadedRun, explanation: dict) -> tuple[list[str], list[str]]:
    """Write explanation.json and .md, the labelled circuit.dot and the grouped drawing."""
    from circuitctl.explain.drawing import write_drawings

    record = full_record(run, explanation)
    write_json(run.run_dir / "explanation.json", record)
    write_atomic(run.run_dir / "explanation.md", to_markdown(record))
    files, notes = write_drawings(run, record)
    return ["explanation.json", "explanation.md", *files], notes


EXPLANATION_FILES = ("explanation.json", "explanation.md", "circuit.grouped.dot", "circuit.grouped.svg")


def remove_explanations(run_dir: Path) -> list[str]:
    """Remove the explanation files of the run in `run_dir` (and of each circuit of a sweep):
    `discover --force` rewrites circuit.dot unlabelled, so an earlier run's explanation would
    describe another circuit. Returns the removed files, relative to run_dir."""
    run_dir = Path(run_dir)
    removed = []
    for directory in [run_dir, *sorted(p.parent for p in run_dir.glob("*/circuit.json"))]:
        for name in EXPLANATION_FILES:
            path = directory / name
            if path.is_file():
                path.unlink()
                removed.append(str(path.relative_to(run_dir)))
    return removed
