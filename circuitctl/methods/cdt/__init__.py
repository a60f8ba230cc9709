"""Contextual decomposition for transformers (CD-T; Hsu et al. 2024): scores without patching.

Per batch of examples (the decomposition rules live in `circuitctl.methods.cdt.decomposition`):

1. Node contributions, from the output. Every node is a source (with
   ``per_position``, every node at every position, as the paper's "heads at specific sequence
   positions"): its relevant part is its output minus its reference output (the ablation),
   propagated to the logits with the other parts irrelevant. Its contribution c(t) is the
   metric's importance of removing the relevant logits: ``sign * (m(logits - rel) - m(logits))``,
   which for the logit difference is the relevant logits projected on logit[answer] -
   logit[wrong]. Many sources go through one forward-like pass (a leading source dimension).
2. Edge scores, backwards from each target. For an edge u -> v into node t, u's relevant output
   enters t's input v directly (the edge) and is decomposed through t alone (t's pattern and
   nonlinearity from the full input; q and k inputs only with ``decompose_qk``). The relevant
   change x it causes in t's output is credited with t's own contribution in proportion to
   how much of t's change it explains: ``score = c(t) <x, delta_t> / |delta_t|^2`` per example
   (and position) -- the reference's "dot" relevance of a source to a target, in metric units.
   Edges into the logits use their relevant logits directly. Scores are positive when the edge
   supports the behaviour and equal exact edge patching on models that are linear in the
   decomposed path.
3. Native circuit: from the logits backwards, keep the edges into kept nodes whose |score| is
   at least ``threshold`` times the total effect (the contribution of the whole ``input``) and
   whose source's |contribution| also is; then drop what is not connected to input and logits.

The sums over batches (edge and node contributions, total effect, cost) are saved after whole
batches, every `checkpoint_every_seconds` and on Ctrl-C, and ``circuitctl discover CONFIG
--resume RUN_DIR`` continues with the next batch: the same additions in the same order, so the
same scores and circuit, bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import CdtSettings
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.pruning import prune
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.methods.cdt.decomposition import Decomposer, FullRun
from circuitctl.patching.engine import BatchState
from circuitctl.progress import bar
from circuitctl.tasks.data import TaskData

METHOD = "cdt"


class _Scorer:
    """Metric importance of removing relevant logits, per stream and example.

    The logit difference reads a few vocabulary entries only: then only those `columns` are
    decomposed (the unembedding of every stream is otherwise a large share of the work)."""

    def __init__(self, context: DiscoveryContext, state: BatchState) -> None:
        self.metric = context.metric
        self.sign = context.metric.importance_sign
        batch = state.batch
        full = state.clean.logits.float()
        self.columns = None
        if context.metric.name == "logit_diff":
            ids = torch.cat([batch.answers.flatten(), batch.wrong.flatten()])
            self.columns = torch.unique(ids[ids >= 0])  # sorted

            def remap(x):
                return torch.where(x >= 0, torch.searchsorted(self.columns, x.clamp(min=0)), x)

            batch = TaskData(batch.clean, batch.corrupt, batch.lengths, remap(batch.answers), remap(batch.wrong), batch.positions)
            full = full[:, self.columns]
        self.batch, self.full = batch, full
        self.m_full = self.metric(full, batch, full)

    def __call__(self, rel_logits: torch.Tensor, irrel_logits: torch.Tensor | None = None) -> torch.Tensor:
        """[S, B, vocab or columns] -> importance [S, B]."""
        S, B = rel_logits.shape[:2]
        irrel = self.full[None] - rel_logits.float() if irrel_logits is None else irrel_logits.float()
        values = self.metric(irrel.flatten(0, 1), self.batch.repeat(S), self.full.repeat(S, 1))
        return self.sign * (values.view(S, B) - self.m_full[None])


def _streams(deltas: torch.Tensor, graph, per_position: bool, n_positions: int) -> list[tuple[int, int | None]]:
    """(node, position or None) source streams whose relevant part is not identically zero,
    ordered by layer and then position: chunks of streams then start late and cover a short
    window of positions (see `Decomposer.propagate`)."""
    nonzero = deltas.abs().amax(dim=(1, 3)) > 0  # [U, P]
    streams: list[tuple[int, int | None]] = []
    for u in range(graph.n_upstream):
        if per_position:
            streams += [(u, p) for p in range(n_positions) if bool(nonzero[u, p])]
        elif bool(nonzero[u].any()):
            streams.append((u, None))
    return sorted(streams, key=lambda s: (graph.upstream_layer[s[0]], s[1] or 0, s[0]))


def node_contributions(
    decomposer: Decomposer, run: FullRun, deltas: torch.Tensor, score: _Scorer, settings: CdtSettings, advance=None
) -> tuple[torch.Tensor, float]:
    """c [U, B, P] (per_position) or [U, B, 1]: importance of each source; and the pass cost in
    forward-pass equivalents over this batch."""
    graph, L = decomposer.graph, decomposer.cfg.n_layers
    U, B, P = deltas.shape[:3]
    n_positions = int(run.positions.max()) + 1  # later positions cannot reach any answer
    streams = _streams(deltas, graph, settings.per_position, n_positions)
    contrib = torch.zeros(U, B, P if settings.per_position else 1, dtype=torch.float64, device="cpu")
    cost = 0.0
    for lo in range(0, len(streams), settings.sources_per_pass):
        chunk = streams[lo : lo + settings.sources_per_pass]
        sources = torch.zeros(len(chunk), U, dtype=torch.bool, device="cpu")
        for s, (u, _) in enumerate(chunk):
            sources[s, u] = True
        positions = None
        if settings.per_position:
            positions = torch.zeros(len(chunk), P, dtype=torch.bool, device="cpu")
            for s, (_, p) in enumerate(chunk):
                positions[s, p] = True
        out = decomposer.propagate(run, deltas, sources, positions, columns=score.columns)
        values = score(out.rel, out.irrel).double().cpu()  # [S, B]
        for s, (u, p) in enumerate(chunk):
            contrib[u, :, 0 if p is None else p] = values[s]
        start = max(0, min(graph.upstream_layer[u] for u, _ in chunk))
        cost += len(chunk) * (L - start) / L
        if advance:
            advance(len(chunk))
    return contrib, cost


def target_weights(contrib: torch.Tensor, deltas: torch.Tensor, per_position: bool) -> torch.Tensor:
    """[U, B, P]: a target's contribution per unit of its own squared change."""
    sq = deltas.double().pow(2).sum(-1).cpu()  # [U, B, P]
    if not per_position:
        sq = sq.sum(-1, keepdim=True)
    tiny = 1e-12 * sq.amax().clamp(min=1e-30)
    weights = torch.where(sq > tiny, contrib / sq.clamp(min=tiny), torch.zeros_like(sq))
    return weights.expand(-1, -1, deltas.shape[2]).to(deltas.dtype).to(deltas.device)


def edge_scores(
    decomposer: Decomposer, run: FullRun, deltas: torch.Tensor, weights: torch.Tensor, score: _Scorer, settings: CdtSettings
) -> tuple[torch.Tensor, float]:
    """Summed (over the batch) edge scores [U, V] and the cost in forward-pass equivalents."""
    graph, L = decomposer.graph, decomposer.cfg.n_layers
    directions = decomposer.target_directions(deltas, weights)
    sums = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float64, device="cpu")
    cost = 0.0
    per_layer = 2.0 if decomposer.qk == "irrelevant_first" else 1.0
    for lo in range(0, graph.n_upstream, settings.sources_per_pass):
        chunk = list(range(lo, min(lo + settings.sources_per_pass, graph.n_upstream)))
        direct = deltas[chunk]
        first = max(0, min(graph.upstream_layer[u] for u in chunk))
        sums[chunk] += decomposer.edge_relevance(run, direct, directions, first).double().cpu()
        sums[chunk, graph.logits_index] += score(decomposer.direct_logits(run, direct, score.columns)).double().sum(1).cpu()
        cost += per_layer * len(chunk) * (L - first) / L
    return sums, cost


def native_circuit(scores: torch.Tensor, node_scores: torch.Tensor, graph, threshold: float) -> torch.Tensor:
    """Backwards from the logits: keep edges into kept nodes with |score| >= threshold whose
    source node's |contribution| >= threshold too; then keep what connects input to logits."""
    kept_nodes = {naming.LOGITS}
    node_ok = node_scores.abs() >= threshold
    node_ok[0] = True  # the input is where every path starts
    membership = torch.zeros_like(graph.edge_mask)
    for v in reversed(range(graph.n_downstream)):  # downstream inputs are in topological order
        if graph.node_of_input(v) not in kept_nodes:
            continue
        for u in range(graph.prefix_len[v]):
            if node_ok[u] and abs(float(scores[u, v])) >= threshold:
                membership[u, v] = True
                kept_nodes.add(graph.upstream[u])
    return prune(membership, graph)


@dataclass(frozen=True)
class _Sums:
    """Sums over the first `done` examples (whole batches). Replaced after every batch, never
    changed in place, so that a Ctrl-C at any moment finds a consistent one to save."""

    done: int
    edges: torch.Tensor  # float64 [U, V]
    nodes: torch.Tensor  # float64 [U]
    total: float  # the whole input's contribution
    passes: float  # forward-pass equivalents

    def to_checkpoint(self, n_examples: int) -> tuple[dict, dict]:
        # floats in JSON round-trip exactly (shortest repr)
        state = {"examples_done": self.done, "n_examples": n_examples, "total_sum": self.total, "passes": self.passes}
        return state, {"edge_sums": self.edges, "node_sums": self.nodes}

    @classmethod
    def restore(cls, state: dict, tensors: dict, n_examples: int, graph, where) -> "_Sums":
        edges, nodes = tensors.get("edge_sums"), tensors.get("node_sums")
        if (
            state.get("n_examples") != n_examples
            or edges is None
            or nodes is None
            or tuple(edges.shape) != (graph.n_upstream, graph.n_downstream)
            or tuple(nodes.shape) != (graph.n_upstream,)
        ):
            raise UsageError(f"{where}: the checkpoint does not fit this model and task; delete it to start over")
        return cls(int(state["examples_done"]), edges.double(), nodes.double(), float(state["total_sum"]), float(state["passes"]))


def _batch_sums(context: DiscoveryContext, settings: CdtSettings, decomposer: Decomposer, state: BatchState, sums: _Sums) -> _Sums:
    """`sums` with one more batch's node and edge contributions, total effect and cost added."""
    graph, batch = context.graph, state.batch
    run = decomposer.full_run(batch.clean, batch.answer_positions)
    deltas = (state.clean.outputs - state.ablation_outputs).expand_as(state.clean.outputs)
    score = _Scorer(context, state)
    contrib, cost_nodes = node_contributions(decomposer, run, deltas, score, settings)
    weights = target_weights(contrib, deltas, settings.per_position)
    edges, cost_edges = edge_scores(decomposer, run, deltas, weights, score, settings)
    # the whole input as one source: the total effect (per-position contributions of a
    # node need not add up to it: the decomposition is not linear)
    whole = torch.zeros(1, graph.n_upstream, dtype=torch.bool, device="cpu")
    whole[0, 0] = True
    out = decomposer.propagate(run, deltas, whole, columns=score.columns)
    return _Sums(
        sums.done + batch.n,
        sums.edges + edges,
        sums.nodes + contrib.sum(dim=(1, 2)),
        sums.total + float(score(out.rel, out.irrel).double().sum()),
        # clean run, reference run, full run for the decomposition statistics, total effect
        sums.passes + (4 + cost_nodes + cost_edges) * batch.n / context.data.n,
    )


def discover(context: DiscoveryContext, settings: CdtSettings) -> DiscoveryResult:
    graph = context.graph
    qk = settings.qk_rule if settings.decompose_qk else None
    decomposer = Decomposer(context.adapter, bias=settings.bias, qk=qk)
    engine = context.engine(settings.batch_size)
    zeros = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float64, device="cpu")
    sums = _Sums(0, zeros, torch.zeros(graph.n_upstream, dtype=torch.float64, device="cpu"), 0.0, 0.0)

    def snapshot() -> tuple[dict, dict]:
        return sums.to_checkpoint(context.data.n)

    autosave = Autosave(context.checkpoint, METHOD, settings.checkpoint_every_seconds, snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        sums = _Sums.restore(*loaded, context.data.n, graph, context.checkpoint.dir)
    n_batches_total = -(-context.data.n // settings.batch_size)
    try:
        with torch.no_grad(), bar("CD-T", n_batches_total) as advance:
            advance(-(-sums.done // settings.batch_size))
            # the unfinished examples, in batches as `PatchingEngine.states` makes them
            for state in engine.sizer.map(context.data.slice(sums.done, context.data.n), engine.batch_state):
                sums = _batch_sums(context, settings, decomposer, state, sums)
                advance()
                autosave.maybe_save()
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise autosave.interrupted("CD-T") from None
    n = context.data.n
    scores = (sums.edges / n).float() * graph.edge_mask
    node_scores = (sums.nodes / n).float()
    total = abs(sums.total / n)
    if total < 1e-12:  # the input carries no effect (e.g. identical clean/corrupt prompts)
        total = float(node_scores.abs().max())
    threshold = settings.threshold * total
    membership = native_circuit(scores, node_scores, graph, threshold)
    extra = {
        "node_scores": {name: round(float(node_scores[u]), 6) for u, name in enumerate(graph.upstream)},
        "total_effect": sums.total / n,
        "threshold_abs": threshold,
    }
    return DiscoveryResult(scores=scores, membership=membership, forward_passes=sums.passes, extra=extra)
