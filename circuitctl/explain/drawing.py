"""Drawings of an explanation: labels in circuit.dot and the grouped circuit.grouped.dot.

The labels are one marked block of node statements appended to the run's circuit.dot (Graphviz
lets a later statement set a node's attributes), so the drawing the method wrote is kept and a
rerun replaces only the block. The grouped drawing has one node per group (per position group
in per-position circuits) and one edge per (sender group, receiver group, channel) with the
summed edge scores. Every name is escaped.
"""

from __future__ import annotations

import re
from pathlib import Path

from circuitctl.explain.load import LoadedRun
from circuitctl.io.escape import dot_string

BEGIN = "  // circuitctl explain: node labels"
END = "  // end of circuitctl explain labels"
_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
CHANNEL_COLOURS = {"q": "#7b3294", "k": "#1a9641", "v": "#e66101"}
POSITIVE, NEGATIVE = "#2c5d8f", "#c0392b"
FILL = {"head": "#cfe2f3", "mlp": "#fde9c9", "io": "#dddddd", "group": "#d9ead3"}


quote = dot_string  # a Graphviz double-quoted string holding `text` literally (entities, control characters)


def label(lines: list[str]) -> str:
    """A quoted multi-line label: each line escaped, joined by Graphviz's line break."""
    return '"' + "\\n".join(quote(line)[1:-1] for line in lines) + '"'


def describe(entry: dict) -> list[str]:
    """Short label lines for a node: its first role (or top target) and its DLA."""
    lines = []
    listed = entry.get("roles") or []
    if listed:
        first = listed[0]
        lines.append(first["role"] + (f"->{first['target']}" if first.get("target") else "") + f" {first['score']:.2f}")
    elif entry.get("attention"):
        a = entry["attention"]
        lines.append(f"attends {a['top_target']} {a['top_attention']:.2f}")
    if entry.get("dla"):
        lines.append(f"DLA {entry['dla']['clean']:+.2f}")
    return lines


def _component(node_name: str) -> tuple[str, str | None]:
    base, _, position = node_name.partition("@")
    return base, position or None


def without_labels(dot: str) -> str:
    """circuit.dot as the method drew it: the explanation's label block removed."""
    return _BLOCK.sub("", dot)


def labelled_dot(run: LoadedRun, record: dict, dot: str) -> str:
    """circuit.dot with the explanation's labels (an earlier label block is replaced)."""
    dot = without_labels(dot)
    statements = []
    for name, node in run.nodes.items():
        entry = record["nodes"].get(node.component)
        if entry is None or quote(name) not in dot:
            continue
        if node.kind == "feature":
            base = [name, f"{node.score:+.3g}" if node.score is not None else ""] + ([node.label[:40]] if node.label else [])
        elif node.position is not None:
            base = [node.component, f"@{node.position}"]
        else:
            base = [name]
        statements.append(f"  {quote(name)} [label={label(base + describe(entry))}];")
    if not statements:
        return dot
    head, brace, tail = dot.rpartition("}")
    return head + "\n".join([BEGIN, *statements, END]) + "\n" + brace + tail


def _layer(name: str, n_layers: int) -> int:
    base = name.split("@")[0]
    if base == "input":
        return -1
    if base == "logits":
        return n_layers
    match = re.match(r"^[am](\d+)", base)
    return int(match.group(1)) if match else n_layers


def grouped_dot(run: LoadedRun, record: dict, n_layers: int) -> str:
    """One node per group, edges summed per (sender group, receiver group, channel)."""
    group_of = {name: entry["group"] for name, entry in record["nodes"].items() if "group" in entry}
    groups = {g["id"]: g for g in record["groups"]}

    def grouped(node_name: str) -> str:
        base, position = _component(node_name)
        gid = group_of.get(base)
        if gid is None:
            return node_name
        return gid + (f"@{position}" if position else "")

    summed: dict[tuple[str, str, str | None], float] = {}
    for name, score in run.edges.items():
        up, down = name.split("->", 1)
        channel = down[-2] if down.endswith(">") else None
        receiver = down[: -3] if channel else down
        key = (grouped(up), grouped(receiver), channel)
        summed[key] = summed.get(key, 0.0) + score
    shown = {g for key in summed for g in key[:2]}
    for node in run.nodes.values():
        shown.add(grouped(node.name))
    max_abs = max((abs(s) for s in summed.values()), default=1.0) or 1.0
    lines = [
        "digraph grouped_circuit {",
        "  rankdir=BT; splines=true; nodesep=0.3; ranksep=0.6;",
        f"  label={quote(run.title + ' | grouped')}; labelloc=t; fontname=Helvetica;",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=11];',
    ]
    ranks: dict[int, list[str]] = {}
    for node_name in sorted(shown):
        gid, _, position = node_name.partition("@")
        where = [f"@{position}"] if position else []
        if gid in groups:
            group = groups[gid]
            members = group["members"]
            layer = min(_layer(m, n_layers) for m in members)
            if len(members) > 1:
                text = [group["name"].split(":")[0], ", ".join(members), f"DLA {group['dla_clean']:+.2f}"]
                fill = FILL["group"]
            else:
                entry = record["nodes"][members[0]]
                text = [members[0], *describe(entry)]
                fill = FILL["mlp" if entry["kind"] == "mlp" else "head"]
        else:
            layer, text, fill = _layer(node_name, n_layers), [gid], FILL["io"]
        ranks.setdefault(layer, []).append(node_name)
        lines.append(f"  {quote(node_name)} [label={label(text + where)}, fillcolor={quote(fill)}];")
    for layer in sorted(ranks):
        lines.append(f"  {{ rank=same; {' '.join(quote(n) for n in ranks[layer])} }}")
    for (up, down, channel), score in summed.items():
        colour = CHANNEL_COLOURS[channel] if channel else (POSITIVE if score >= 0 else NEGATIVE)
        extra = f", label={quote(channel)}, fontcolor={quote(colour)}" if channel else ""
        lines.append(
            f"  {quote(up)} -> {quote(down)} [color={quote(colour)}, penwidth={0.5 + 4.5 * abs(score) / max_abs:.2f}, "
            f"style={'dashed' if score < 0 else 'solid'}, tooltip={quote(f'{up}->{down}: {score:.4g}')}{extra}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_drawings(run: LoadedRun, record: dict) -> tuple[list[str], list[str]]:
    """Label circuit.dot (and re-render its .svg), draw circuit.grouped.dot (.svg). The two
    Graphviz renders run side by side (each is a `dot` subprocess: most of explain's time on
    small circuits)."""
    from concurrent.futures import ThreadPoolExecutor

    from circuitctl.io.graphviz import write_drawing

    if run.kind == "neuron":
        return [], ["neuron circuits are drawn neuron by neuron: circuit.dot is left as it is and no grouped drawing is made"]
    drawings: dict[Path, str] = {}
    notes = []
    dot_path = run.run_dir / "circuit.dot"
    if dot_path.is_file():
        drawings[dot_path] = labelled_dot(run, record, dot_path.read_text())
    else:
        notes.append("the run has no circuit.dot to label")
    if run.kind == "feature":
        notes.append("feature circuits have no head groups: no grouped drawing")
    else:
        info = run.record_info
        n_layers = int((info.get("model") or {}).get("n_layers") or info.get("graph", {}).get("n_layers") or 0)
        drawings[run.run_dir / "circuit.grouped.dot"] = grouped_dot(run, record, n_layers)
    with ThreadPoolExecutor(max_workers=2) as pool:
        drawn = list(pool.map(write_drawing, drawings, drawings.values()))
    files = []
    for path, (svg, note) in zip(drawings, drawn):
        files += [path.name] + ([svg.name] if svg else [])
        notes.append(note)
    return files, notes
