"""Graphviz drawing of a feature circuit: SAE features and error nodes in rows by site
(embed at the bottom, logits on top), edges coloured by sign, width by |score|."""

from __future__ import annotations

from circuitctl.graph import naming
from circuitctl.io.graphviz import NEGATIVE, POSITIVE, quote, quote_lines

_FILL = {"embed": "#dddddd", "attn": "#d9ead3", "mlp": "#fde9c9", "resid": "#cfe2f3"}


def feature_dot(
    sites: list[str],
    node_scores: dict[str, float],
    circuit_nodes: list[str],
    edges: list[tuple[str, str, float]],
    labels: dict[str, str],
    title: str = "",
) -> str:
    """DOT source: `circuit_nodes` with their scores and labels, `edges` (upstream, downstream, score) between them."""
    shown = set(circuit_nodes) | {naming.LOGITS}
    edges = [(u, d, s) for u, d, s in edges if u in shown and d in shown]
    max_abs = max((abs(s) for _, _, s in edges), default=1.0) or 1.0
    lines = [
        "digraph feature_circuit {",
        "  rankdir=BT; splines=true; nodesep=0.2; ranksep=0.5;",
        f"  label={quote(title)}; labelloc=t; fontname=Helvetica;",
        "  node [shape=box, style=\"rounded,filled\", fontname=Helvetica, fontsize=10];",
    ]
    by_site: dict[str, list[str]] = {}
    for name in circuit_nodes:
        by_site.setdefault(naming.parse_feature_node(name).site, []).append(name)
    for site in sites:
        members = by_site.get(site, [])
        if not members:
            continue
        kind = naming.parse_site(site).kind
        rows = []
        for name in members:
            node = naming.parse_feature_node(name)
            text = [name, f"{node_scores.get(name, 0.0):+.3g}"]
            if name in labels:
                text.append(labels[name][:40])
            shape = ", shape=octagon, fillcolor=\"#eeeeee\"" if node.is_error else ""
            rows.append(f"{quote(name)} [label={quote_lines(text)}{shape}]")
        lines.append(f"  {{ rank=same; node [fillcolor={quote(_FILL[kind])}]; " + "; ".join(rows) + "; }")
    lines.append(f"  {{ rank=max; {quote(naming.LOGITS)} [fillcolor=\"#dddddd\"]; }}")
    for up, down, score in edges:
        colour = POSITIVE if score >= 0 else NEGATIVE
        width = 0.5 + 4.5 * abs(score) / max_abs
        style = "solid" if score >= 0 else "dashed"
        lines.append(
            f"  {quote(up)} -> {quote(down)} [color={quote(colour)}, penwidth={width:.2f}, style={style}, "
            f"tooltip={quote(f'{up}->{down}: {score:.4g}')}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
