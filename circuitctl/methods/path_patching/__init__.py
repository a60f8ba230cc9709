"""Automatic path patching (the IOI line of work: Wang et al. 2022 and its automatic variant).

The circuit grows backwards from the answer position of the logits. For a receiver (a node at
a token position) every candidate sender path is patched on its own: the sender's output takes
its ablation value only along the direct path into one input of the receiver (a head's q, k
or v; an MLP's input; the logits), and the change reaches the metric only through the
receiver's already-found downstream paths; everything else stays at its clean value. A path
is kept when its effect exceeds the threshold, and its sender becomes a receiver. Receivers
are visited in reverse topological order, so a receiver's downstream circuit is complete
when its senders are tested. A head reads keys and values at every earlier position, so the
senders of its k and v inputs may sit at other positions than the head: the circuit is
position-aware (``a0.h0@S1->a1.h0@end<k>``).

Selection rule per receiver R (scores are signed importances: positive when the path helps
the behaviour, so patching it hurts):

* absolute: keep when |score| > threshold;
* relative: keep when |score| > threshold * |effect(R)|, where effect(R) is the effect of
  patching R's whole output through its downstream circuit (at the logits: the clean-ablated
  metric gap), i.e. a fraction of the effect that remains to be explained at R;
* top_k: additionally keep R's top_k senders by |score|.

Relative thresholds and top_k never keep a path below 1% of the total effect (the gap).

Positions are the task's single-token position groups (`circuitctl.graph.positions`: its labels
and ``end``, or every token of equal-length prompts; the unlabelled tokens of ``other`` never
send). The result is a per-position edge circuit (`circuitctl.circuits.positional`): every
tested path's score at its (sender position, receiver position), the kept paths as the circuit;
its MIB file is the projection onto the ordinary edge graph.

Long searches save their progress after whole receivers, every `checkpoint_every_seconds` and
on Ctrl-C; ``circuitctl discover CONFIG --resume RUN_DIR`` continues with the next receiver and
ends with exactly the circuit and scores of an uninterrupted run.
"""

from __future__ import annotations

import heapq
from dataclasses import astuple, dataclass, field
from typing import Callable, Sequence

import torch

from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import PathPatchingSettings
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.methods.path_patching.patcher import NodePatch, PathEdge, PathPatcher, Source, check_supported
from circuitctl.progress import bar
from circuitctl.graph.positions import PositionLayout

METHOD = "path_patching"
NEGLIGIBLE = 0.01  # top_k and relative thresholds never keep paths below this fraction of the total effect

# evaluate(circuit, sources, description) -> [K] dataset-mean metric with each source patched
Evaluator = Callable[[Sequence[PathEdge], Sequence[Source], str], torch.Tensor]


# ----------------------------------------------------------------------------------------
# The search
# ----------------------------------------------------------------------------------------
@dataclass
class PositionalCircuit:
    """What the search found: every tested path's score and the kept ones."""

    slots: PositionLayout  # path senders and receivers sit at its single-token groups
    scores: dict[PathEdge, float] = field(default_factory=dict)  # every tested path
    kept: list[PathEdge] = field(default_factory=list)
    effects: dict[tuple[int, int], float] = field(default_factory=dict)  # expanded receiver -> effect(R)
    depth: dict[tuple[int, int], int] = field(default_factory=dict)
    total_effect: float = 0.0  # effect of the logits' whole input: the clean-ablated gap
    n_patches: int = 0  # patched copies over the dataset (forward-pass equivalents)


def _allowed_senders(graph: Graph, node_types: Sequence[str]) -> list[bool]:
    allowed = []
    for name in graph.upstream:
        kind = naming.parse_node(name).kind
        allowed.append({"input": "input", "head": "heads", "mlp": "mlps"}[kind] in node_types)
    return allowed


def candidate_paths(graph: Graph, receiver: tuple[int, int], allowed: list[bool], earlier: list[list[int]]) -> list[PathEdge]:
    """Every direct path into `receiver` = (node, slot) from an allowed sender."""
    node, slot = receiver
    if node == graph.n_upstream:
        inputs = [graph.logits_index]
    else:
        layer = graph.upstream_layer[node]
        if graph.mlp_out_index[layer] == node:
            inputs = [graph.mlp_in_index[layer]]
        else:
            h = node - graph.head_out_start[layer]
            inputs = [graph.q_in_start[layer] + c * graph.spec.n_heads + h for c in range(3)]
    paths = []
    for v in inputs:
        channel = naming.parse_node(graph.downstream[v]).channel
        sender_slots = earlier[slot] if channel in ("k", "v") else [slot]
        for u in range(graph.prefix_len[v]):
            if allowed[u]:
                paths.extend(PathEdge(u, s, v, slot) for s in sender_slots)
    return paths


def start_search(graph: Graph, slots: PositionLayout) -> tuple[PositionalCircuit, list[tuple[int, int]]]:
    """An empty circuit and the frontier holding the root: the logits at the answer position."""
    found = PositionalCircuit(slots)
    root = (graph.n_upstream, slots.answer)
    found.depth[root] = 0
    return found, [(-root[0], -root[1])]  # max-heap on node id: reverse topological order


def grow_circuit(
    graph: Graph,
    slots: PositionLayout,
    slot_index: torch.Tensor,
    settings: PathPatchingSettings,
    evaluate: Evaluator,
    clean_value: float,
    sign: float,
    changed: torch.Tensor | None = None,
    start: tuple[PositionalCircuit, list[tuple[int, int]]] | None = None,
    on_receiver: Callable[[PositionalCircuit, list[tuple[int, int]]], None] | None = None,
) -> PositionalCircuit:
    """The greedy backwards search; `evaluate` computes path-patched metric values.

    `changed` ([U, S] bool, optional) marks sender outputs that differ between the clean and
    the ablated run at a slot; paths from the others are scored 0 without being patched.
    `start`: (circuit, frontier) to continue from (default: `start_search`); `on_receiver` is
    called with them after every expanded receiver.
    """
    # keys and values are read at positions up to the query: a slot after the receiver's in
    # every example cannot send into its k or v
    earlier = [[s for s in range(slots.n_single) if bool((slot_index[s] <= slot_index[r]).any())] for r in range(slots.n_single)]
    allowed = _allowed_senders(graph, settings.node_types)
    result, frontier = start if start is not None else start_search(graph, slots)
    root = (graph.n_upstream, slots.answer)
    while frontier:
        node, slot = heapq.heappop(frontier)
        receiver = (-node, -slot)
        depth = result.depth[receiver]
        if settings.max_depth is not None and depth >= settings.max_depth:
            continue
        paths = candidate_paths(graph, receiver, allowed, earlier)
        if changed is not None:
            for path in paths:
                if not changed[path.sender, path.sender_slot]:
                    result.scores[path] = 0.0
            paths = [p for p in paths if changed[p.sender, p.sender_slot]]
        description = f"path patching {_node_name(graph, receiver, slots)} (depth {depth}, {len(frontier)} waiting)"
        values = evaluate(result.kept, [NodePatch(*receiver), *paths], description)
        result.n_patches += 1 + len(paths)
        importance = (sign * (values.double() - clean_value)).tolist()
        effect, scores = importance[0], importance[1:]
        result.effects[receiver] = effect
        if receiver == root:
            result.total_effect = effect
        for i, path in enumerate(paths):
            result.scores[path] = scores[i]
        for i in select_senders(scores, effect, result.total_effect, settings):
            path = paths[i]
            result.kept.append(path)
            sender = (path.sender, path.sender_slot)
            if graph.upstream[path.sender] == naming.INPUT:
                continue
            if sender not in result.depth:
                heapq.heappush(frontier, (-sender[0], -sender[1]))
                result.depth[sender] = depth + 1
            else:  # reached again from another receiver: keep the shortest distance to the logits
                result.depth[sender] = min(result.depth[sender], depth + 1)
        if on_receiver is not None:
            on_receiver(result, frontier)
    return result


def select_senders(scores: list[float], effect: float, total_effect: float, settings: PathPatchingSettings) -> list[int]:
    """Indices of the kept paths into one receiver whose own effect is `effect`."""
    floor = NEGLIGIBLE * abs(total_effect)
    if settings.threshold_mode == "absolute":
        cutoff = settings.threshold
    else:
        cutoff = max(settings.threshold * abs(effect), floor)
    keep = {i for i, s in enumerate(scores) if abs(s) > cutoff}
    if settings.top_k:
        ranked = sorted(range(len(scores)), key=lambda i: -abs(scores[i]))
        keep |= {i for i in ranked[: settings.top_k] if abs(scores[i]) > floor}
    return sorted(keep)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """The search after a whole receiver. The circuit's scores, kept paths and effects only
    grow (every receiver is expanded once, every path belongs to one receiver), so their
    lengths then mark a consistent prefix; depths and the frontier change in place and are
    copied. Replaced, never changed, so that a Ctrl-C at any moment finds one to save."""

    n_scores: int
    n_kept: int
    n_effects: int
    depth: tuple  # ((node, slot, depth), ...)
    frontier: tuple  # the heap's list, as it was
    total_effect: float
    n_patches: int

    @classmethod
    def of(cls, found: PositionalCircuit, frontier: list) -> "Progress":
        depth = tuple((node, slot, d) for (node, slot), d in found.depth.items())
        return cls(len(found.scores), len(found.kept), len(found.effects), depth, tuple(frontier), found.total_effect, found.n_patches)

    def to_checkpoint(self, found: PositionalCircuit) -> tuple[dict, dict]:
        scored = list(found.scores.items())[: self.n_scores]
        state = {
            "receivers_done": self.n_effects,
            "effects": [[node, slot, effect] for (node, slot), effect in list(found.effects.items())[: self.n_effects]],
            "depth": [list(entry) for entry in self.depth],
            "frontier": [list(entry) for entry in self.frontier],
            "total_effect": self.total_effect,
            "n_patches": self.n_patches,
        }
        tensors = {
            "paths": _path_table([path for path, _ in scored]),
            "scores": torch.tensor([score for _, score in scored], dtype=torch.float64, device="cpu"),
            "kept": _path_table(found.kept[: self.n_kept]),
        }
        return state, tensors

    @staticmethod
    def restore(state: dict, tensors: dict, slots: PositionLayout) -> tuple[PositionalCircuit, list[tuple[int, int]]]:
        """The circuit and frontier saved by `to_checkpoint` (scores in their original order)."""
        paths = [PathEdge(*row) for row in tensors["paths"].tolist()]
        found = PositionalCircuit(
            slots,
            scores=dict(zip(paths, tensors["scores"].tolist())),
            kept=[PathEdge(*row) for row in tensors["kept"].tolist()],
            effects={(node, slot): effect for node, slot, effect in state["effects"]},
            depth={(node, slot): d for node, slot, d in state["depth"]},
            total_effect=state["total_effect"],
            n_patches=state["n_patches"],
        )
        return found, [(a, b) for a, b in state["frontier"]]


def _path_table(paths: list[PathEdge]) -> torch.Tensor:
    """[N, 4] int64: sender, sender slot, receiver input, receiver slot."""
    return torch.tensor([astuple(p) for p in paths], dtype=torch.int64, device="cpu").reshape(len(paths), 4)


class _Saver:
    """The search's latest `Progress`, saved to the run's checkpoint (see `Autosave`)."""

    def __init__(self, context: DiscoveryContext, settings: PathPatchingSettings, slots: PositionLayout) -> None:
        self.autosave = Autosave(context.checkpoint, METHOD, settings.checkpoint_every_seconds, self.snapshot)
        loaded = self.autosave.load(context.resume)
        self.found, frontier = Progress.restore(*loaded, slots) if loaded else start_search(context.graph, slots)
        self.start = (self.found, frontier)  # where the search starts (or continues)
        self.progress = Progress.of(self.found, frontier)

    def snapshot(self) -> tuple[dict, dict]:
        return self.progress.to_checkpoint(self.found)

    def on_receiver(self, found: PositionalCircuit, frontier: list) -> None:
        self.progress = Progress.of(found, frontier)  # `found` is `self.found`, grown in place
        self.autosave.maybe_save()


# ----------------------------------------------------------------------------------------
# The batched evaluator
# ----------------------------------------------------------------------------------------
def batched_evaluator(
    context: DiscoveryContext, slots: PositionLayout, batch_size: int, senders_per_pass: int
) -> tuple[Evaluator, float, torch.Tensor]:
    """An evaluator that patches `senders_per_pass` sources per forward (K copies of each batch),
    the clean metric, and which sender outputs change under ablation ([U, S] bool)."""
    check_supported(context.adapter)
    engine = context.engine(batch_size, keep_cache=True)
    patchers = [
        (state, PathPatcher(context.adapter, state.clean, state.ablation_outputs, slots.index(state.batch), slots.answer))
        for state in engine.states()
    ]
    n = context.data.n

    def evaluate(circuit: Sequence[PathEdge], sources: Sequence[Source], description: str) -> torch.Tensor:
        totals = torch.zeros(len(sources), dtype=torch.float64, device="cpu")
        chunks = range(0, len(sources), senders_per_pass)
        with bar(description, len(chunks) * len(patchers)) as advance:
            for lo in chunks:
                part = sources[lo : lo + senders_per_pass]
                for state, patcher in patchers:
                    logits = patcher.logits(circuit, part)
                    values = torch.stack([engine.metric_of_logits(lg, state) for lg in logits])
                    totals[lo : lo + len(part)] += values.sum(1).double().cpu()
                    advance()
        return totals / n

    changed = torch.stack([patcher.changed_outputs().cpu() for _, patcher in patchers]).any(0)
    return evaluate, engine.clean_value(), changed


# ----------------------------------------------------------------------------------------
# Names and the per-position circuit
# ----------------------------------------------------------------------------------------
def _node_name(graph: Graph, node: tuple[int, int], slots: PositionLayout) -> str:
    base = naming.LOGITS if node[0] == graph.n_upstream else graph.upstream[node[0]]
    return f"{base}@{slots.names[node[1]]}"


def positional_scores(pgraph, found: PositionalCircuit) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and membership [G, G, U, V] of the per-position graph: every tested path, the kept ones."""
    scores = torch.zeros(pgraph.edge_mask.shape, dtype=torch.float32, device="cpu")
    membership = torch.zeros(pgraph.edge_mask.shape, dtype=torch.bool, device="cpu")
    for path, score in found.scores.items():
        scores[path.sender_slot, path.receiver_slot, path.sender, path.receiver_input] = score
    for path in found.kept:
        membership[path.sender_slot, path.receiver_slot, path.sender, path.receiver_input] = True
    return scores, membership


def discover(context: DiscoveryContext, settings: PathPatchingSettings) -> DiscoveryResult:
    from circuitctl.circuits.positional import PositionalEdgeSpace
    from circuitctl.graph.positional import PositionalGraph

    graph = context.graph
    pgraph = PositionalGraph.from_data(graph, context.data, "method 'path_patching'")
    slots = pgraph.layout
    evaluate, clean_value, changed = batched_evaluator(context, slots, settings.batch_size, settings.senders_per_pass)
    slot_index = slots.index(context.data)
    saver = _Saver(context, settings, slots)
    try:
        found = grow_circuit(
            graph, slots, slot_index, settings, evaluate, clean_value, context.metric.importance_sign, changed,
            start=saver.start, on_receiver=saver.on_receiver,
        )
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise saver.autosave.interrupted("path patching") from None
    scores, membership = positional_scores(pgraph, found)
    receivers = {
        _node_name(graph, node, slots): {"depth": found.depth.get(node), "effect": effect}
        for node, effect in sorted(found.effects.items(), key=lambda item: (-item[0][0], item[0][1]))
    }
    return DiscoveryResult(
        scores=scores,
        membership=membership,
        space=PositionalEdgeSpace(pgraph),
        forward_passes=2.0 + found.n_patches,
        extra={
            "path_patching": {
                "positional_edges_kept": len(found.kept),
                "paths_tested": len(found.scores),
                "receivers_expanded": len(found.effects),
                "total_effect": found.total_effect,
                "metric_clean": clean_value,
                "receivers": receivers,
            }
        },
    )
