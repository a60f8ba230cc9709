"""Every node, edge and unit name circuitctl reads or writes, in exactly one place (no torch).

Edge graph (the MIB / EAP-IG interchange spellings):
    upstream outputs   ``input``, ``a{L}.h{H}`` (attention head), ``m{L}`` (MLP)
    downstream inputs  ``a{L}.h{H}<q|k|v>`` (one per channel of a head), ``m{L}``, ``logits``.
                       Grouped-query attention (fewer key/value heads than heads): ``a{L}.h{H}<q>``
                       per head and ``a{L}.g{G}<k|v>`` per KV group G, the k/v input shared by the
                       r = n_heads / n_kv_heads consecutive heads G*r .. G*r + r - 1. With one KV
                       head per head the names stay ``a{L}.h{H}<k|v>``. ``a{L}.g{G}`` names the
                       group on the downstream side only (it has no output of its own).
    edges              ``{upstream}->{downstream}``: ``input->a0.h1<v>``, ``a0.h1->a1.h2<k>``, ``m3->logits``.
Positions          per-position graphs append ``@{position}`` to node names: ``a3.h0@end``,
                   ``a3.h0@end<k>`` (`positioned`); position names come from
                   `circuitctl.graph.positions.PositionLayout`.
Neurons            ``m{L}.n{i}``: hidden unit i of MLP L (``hook_post``).
SAE features       sites (where an SAE reads and replaces an activation, as in Marks et al. 2024):
                   ``embed`` (the residual stream entering layer 0), ``attn{L}`` (attention output
                   of layer L), ``mlp{L}`` (MLP output), ``resid{L}`` (residual stream after layer L);
                   nodes ``{site}/f{index}`` (a feature) and ``{site}/err`` (the site's SAE error
                   term), per position ``resid0/f12@end``; the metric node is ``logits``.
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
_NEURON_RE = re.compile(r"^m(?P<layer>\d+)\.n(?P<index>\d+)$")
_SITE_RE = re.compile(r"^(?:(?P<embed>embed)|(?P<kind>attn|mlp|resid)(?P<layer>\d+))$")
_FEATURE_RE = re.compile(r"^(?P<site>[a-z]+\d*)/(?:f(?P<feature>\d+)|(?P<err>err))(?:@(?P<pos>[^@/>\s-]+))?$")
_SITE_ORDER = {"attn": 0, "mlp": 1, "resid": 2}


# What a task's position label may be: it becomes part of node names (``a3.h0@S2``), file
# contents and drawings. Letters of any script, digits, '_', '.', '+', '-'; 1 to 64 characters.
POSITION_LABEL = re.compile(r"\w[\w.+-]{0,63}")
POSITION_LABEL_RULE = "letters, digits, '_', '.', '+' or '-', at most 64, starting with a letter, digit or '_'"


def is_position_label(label: object) -> bool:
    return isinstance(label, str) and POSITION_LABEL.fullmatch(label) is not None


# -- the edge graph ------------------------------------------------------------------------
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
    """A parsed node name. `layer` is None for `input` and `logits`."""

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


def split_edge(name: str) -> tuple[str, str]:
    """Split ``u->v`` into its two names (not validated)."""
    parts = name.split("->")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"malformed edge name '{name}' (expected 'upstream->downstream')")
    return parts[0], parts[1]


def parse_edge(name: str) -> tuple[str, str]:
    """Split ``u->v`` into its upstream and downstream names (validated as graph nodes)."""
    upstream, downstream = split_edge(name)
    if parse_node(upstream).channel is not None:
        raise ValueError(f"an upstream node has no channel: '{name}'")
    parse_node(downstream)
    return upstream, downstream


# -- positions ---------------------------------------------------------------------------------
def positioned(name: str, position: str) -> str:
    """``a1.h0<k>`` + ``end`` -> ``a1.h0@end<k>``; ``m0`` -> ``m0@end``."""
    parsed = parse_node(name)
    base = f"{parsed.base}@{position}"
    return f"{base}<{parsed.channel}>" if parsed.channel else base


# -- neurons -----------------------------------------------------------------------------------
def neuron(layer: int, index: int) -> str:
    return f"m{layer}.n{index}"


def parse_neuron(name: str) -> tuple[int, int]:
    match = _NEURON_RE.match(name)
    if not match:
        raise ValueError(f"malformed neuron name '{name}' (expected m<layer>.n<index>)")
    return int(match.group("layer")), int(match.group("index"))


# -- SAE sites and feature nodes ---------------------------------------------------------------
@dataclass(frozen=True)
class Site:
    kind: str  # embed | attn | mlp | resid
    layer: int  # -1 for embed

    @property
    def name(self) -> str:
        return "embed" if self.kind == "embed" else f"{self.kind}{self.layer}"

    @property
    def order(self) -> tuple[int, int]:
        """Sort key in forward order: embed, attn0, mlp0, resid0, attn1, ..."""
        return (self.layer, _SITE_ORDER.get(self.kind, -1))

    def __str__(self) -> str:
        return self.name


def is_site_name(name: str) -> bool:
    return bool(_SITE_RE.match(name))


def parse_site(name: str) -> Site:
    match = _SITE_RE.match(name)
    if not match:
        raise ValueError(f"'{name}' is not a site (embed, attn<L>, mlp<L> or resid<L>, e.g. resid0, mlp3)")
    if match["embed"]:
        return Site("embed", -1)
    return Site(match["kind"], int(match["layer"]))


def sort_sites(sites) -> list[Site]:
    return sorted(sites, key=lambda s: s.order)


@dataclass(frozen=True)
class FeatureNode:
    site: str
    feature: int | None  # None for the error node
    position: str | None = None

    @property
    def is_error(self) -> bool:
        return self.feature is None


def feature_node(site: str, feature: int, position: str | None = None) -> str:
    return f"{site}/f{feature}" + (f"@{position}" if position is not None else "")


def error_node(site: str, position: str | None = None) -> str:
    return f"{site}/err" + (f"@{position}" if position is not None else "")


def parse_feature_node(name: str) -> FeatureNode:
    match = _FEATURE_RE.match(name)
    if not match or not is_site_name(match["site"]):
        raise ValueError(f"'{name}' is not a feature-circuit node (e.g. resid0/f12, mlp1/err, attn2/f3@end)")
    feature = None if match["err"] else int(match["feature"])
    return FeatureNode(match["site"], feature, match["pos"])
