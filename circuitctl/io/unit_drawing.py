"""Graphviz drawings of neuron and per-position circuits (see `circuitctl.circuits`).

Per-position circuits are drawn with one dashed column per position group, labelled with the
position's name, nodes labelled ``a3.h0`` inside it and one row per layer; q/k/v edges are
coloured by channel as in `circuitctl.io.graphviz`.
"""

from __future__ import annotations

import torch

from circuitctl.graph import naming
from circuitctl.io.graphviz import CHANNEL_COLOURS, NEGATIVE, POSITIVE, quote_lines
from circuitctl.io.graphviz import quote as _quote


def _layer(node: naming.NodeName, n_layers: int) -> int:
    return {"input": -1, "logits": n_layers}.get(node.kind, node.layer)  # type: ignore[arg-type]


def _fill(node: naming.NodeName) -> str:
    return {"input": "#dddddd", "logits": "#dddddd", "mlp": "#fde9c9"}.get(node.kind, "#cfe2f3")


def positional_dot(edges: list[tuple[str, str, float]], positions: list[str], n_layers: int, title: str = "") -> str:
    """DOT for per-position edges given as (sender ``u@pos``, receiver input ``v@pos<c>``, score)."""
    max_abs = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    nodes: dict[str, naming.NodeName] = {}
    body = []
    for sender, receiver_input, score in edges:
        up, down = naming.parse_node(sender), naming.parse_node(receiver_input)
        receiver = f"{down.base}@{down.position}"
        nodes[sender], nodes[receiver] = up, down
        colour = CHANNEL_COLOURS[down.channel] if down.channel else (POSITIVE if score >= 0 else NEGATIVE)
        label = f", label={_quote(down.channel)}, fontcolor={_quote(colour)}" if down.channel else ""
        body.append(
            f"  {_quote(sender)} -> {_quote(receiver)} [color={_quote(colour)}, penwidth={0.5 + 4.5 * abs(score) / max_abs:.2f}"
            f", style={'dashed' if score < 0 else 'solid'}, tooltip={_quote(f'{sender}->{receiver_input}: {score:.4g}')}{label}];"
        )
    lines = [
        "digraph circuit {",
        "  newrank=true; rankdir=BT; splines=true; nodesep=0.3; ranksep=0.5;",
        f"  label={_quote(title)}; labelloc=t; fontname=Helvetica;",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=11];',
    ]
    order = {name: i for i, name in enumerate(positions)}
    by_position: dict[str, list[str]] = {}
    by_layer: dict[int, list[str]] = {}
    for name, node in nodes.items():
        by_position.setdefault(node.position or "", []).append(name)
        by_layer.setdefault(_layer(node, n_layers), []).append(name)
    for i, position in enumerate(sorted(by_position, key=lambda p: order.get(p, len(order)))):
        lines.append(f'  subgraph cluster_{i} {{ label={_quote("@" + position)}; labelloc=b; style=dashed; color="#999999";')
        for name in sorted(by_position[position]):
            node = nodes[name]
            lines.append(f"    {_quote(name)} [label={quote_lines([node.base, '@' + str(node.position)])}, fillcolor={_quote(_fill(node))}];")
        lines.append("  }")
    for layer in sorted(by_layer):
        lines.append(f"  {{ rank=same; {' '.join(_quote(n) for n in sorted(by_layer[layer]))} }}")
    lines += body
    lines.append("}")
    return "\n".join(lines) + "\n"


def neuron_dot(scores: torch.Tensor, membership: torch.Tensor, title: str = "", max_listed: int = 40) -> str:
    """One box per MLP layer listing its circuit neurons and their scores."""
    lines = [
        "digraph circuit {",
        "  rankdir=BT; nodesep=0.3;",
        f"  label={_quote(title)}; labelloc=t; fontname=Helvetica;",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=11, fillcolor="#fde9c9"];',
    ]
    previous = None
    for layer in range(membership.shape[0]):
        chosen = membership[layer].nonzero().flatten().tolist()
        if not chosen:
            continue
        chosen.sort(key=lambda i: -abs(float(scores[layer, i])))
        rows = [f"n{i}: {float(scores[layer, i]):.3g}" for i in chosen[:max_listed]]
        if len(chosen) > max_listed:
            rows.append(f"... {len(chosen) - max_listed} more")
        name = naming.mlp(layer)
        lines.append(f"  {_quote(name)} [label={quote_lines([name, *rows])}];")
        if previous is not None:
            lines.append(f"  {_quote(previous)} -> {_quote(name)} [style=invis];")
        previous = name
    lines.append("}")
    return "\n".join(lines) + "\n"
