"""The node and edge naming grammar, in exactly one place.

Upstream outputs:  ``input``, ``a{L}.h{H}`` (attention head), ``m{L}`` (MLP).
Downstream inputs: ``a{L}.h{H}<q|k|v>`` (one per channel of a head), ``m{L}``, ``logits``.
                   Grouped-query attention (fewer key/value heads than heads): ``a{L}.h{H}<q>``
                   per head and ``a{L}.g{G}<k|v>`` per KV group G, the k/v input shared by the
                   r = n_heads / n_kv_heads consecutive heads G*r .. G*r + r - 1. With one KV
                   head per head the names stay ``a{L}.h{H}<k|v>``. ``a{L}.g{G}`` names the
                   group on the downstream side only (it has no output of its own).
Edges:             ``{upstream}->{downstream}``, e.g. ``input->a0.h1<v>``, ``a0.h1->a1.h2<k>``,
                   ``m3->logits``. Per-position graphs append ``@{position}`` to node names
                   (``a3.h0@end``).

These are the spellings of the MIB / EAP-IG interchange format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CHANNELS = ("q", "k", "v")

INPUT = "input"
LOGITS = "logits"

_NODE_RE = re.compile(
    r"^(?:(?P<input>input)|(?P<logits>logits)|a(?P<al>\d+)\.(?P<hg>[hg])(?P<ah>\d+)|m(?P<ml>\d+))(?:@(?P<pos>[^<>@]+))?$"
)
_INPUT_RE = re.compile(r"^(?P<node>[^<>]+?)(?:<(?P<channel>[qkv])>)?$")


# What a task's position label may be: it becomes part of node names (``a3.h0@S2``), file
# contents and drawings. Letters of any script, digits, '_', '.', '+', '-'; 1 to 64 characters.
POSITION_LABEL = re.compile(r"\w[\w.+-]{0,63}")
POSITION_LABEL_RULE = "letters, digits, '_', '.', '+' or '-', at most 64, starting with a letter, digit or '_'"


def is_position_label(label: object) -> bool:
    return isinstance(label, str) and POSITION_LABEL.fullmatch(label) is not None


def head(layer: int, index: int) -> str:
    return f"a{layer}.h{index}"


def kv_group(layer: int, group: int) -> str:
    return f"a{layer}.g{group}"


def kv_group_input(layer: int, group: int, channel: str) -> str:
    return f"a{layer}.g{group}<{channel}>"


def mlp(layer: int) -> str:
    return f"m{layer}"


def head_input(layer: int, index: int, channel: str) -> str:
    return f"a{layer}.h{index}<{channel}>"


def edge(upstream: str, downstream: str) -> str:
    return f"{upstream}->{downstream}"


@dataclass(frozen=True)
class NodeName:
    """A parsed node name. `layer` is -1 for `input` and n_layers for `logits` (set by caller)."""

    kind: str  # "input" | "head" | "group" (a KV group of grouped-query attention) | "mlp" | "logits"
    layer: int | None = None
    index: int | None = None
    channel: str | None = None
    position: str | None = None

    @property
    def base(self) -> str:
        """The node name without channel and position."""
        if self.kind == "input":
            return INPUT
        if self.kind == "logits":
            return LOGITS
        if self.kind == "head":
            return head(self.layer, self.index)  # type: ignore[arg-type]
        if self.kind == "group":
            return kv_group(self.layer, self.index)  # type: ignore[arg-type]
        return mlp(self.layer)  # type: ignore[arg-type]


def parse_node(name: str) -> NodeName:
    """Parse an upstream or downstream node name; raises ValueError on a malformed name."""
    match = _INPUT_RE.match(name)
    if not match:
        raise ValueError(f"malformed node name '{name}'")
    node, channel = match.group("node"), match.group("channel")
    parsed = _NODE_RE.match(node)
    if not parsed:
        raise ValueError(f"malformed node name '{name}'")
    position = parsed.group("pos")
    if parsed.group("input"):
        kind, layer, index = "input", None, None
    elif parsed.group("logits"):
        kind, layer, index = "logits", None, None
    elif parsed.group("al") is not None:
        kind = "head" if parsed.group("hg") == "h" else "group"
        layer, index = int(parsed.group("al")), int(parsed.group("ah"))
    else:
        kind, layer, index = "mlp", int(parsed.group("ml")), None
    if channel is not None and kind not in ("head", "group"):
        raise ValueError(f"only attention heads have q/k/v inputs: '{name}'")
    if kind == "group" and channel == "q":
        raise ValueError(f"a KV group has k and v inputs only (queries are per head): '{name}'")
    return NodeName(kind=kind, layer=layer, index=index, channel=channel, position=position)


def parse_edge(name: str) -> tuple[str, str]:
    """Split ``u->v`` into its upstream and downstream names (validated)."""
    parts = name.split("->")
    if len(parts) != 2:
        raise ValueError(f"malformed edge name '{name}' (expected 'upstream->downstream')")
    upstream, downstream = parts
    if parse_node(upstream).channel is not None:
        raise ValueError(f"an upstream node has no channel: '{name}'")
    parse_node(downstream)
    return upstream, downstream
