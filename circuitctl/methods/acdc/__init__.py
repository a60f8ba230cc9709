"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability").

The algorithm, as in the reference implementation (`acdc/TLACDCExperiment.py`):

* Start from the full graph. Visit the downstream inputs in reverse topological order:
  ``logits``, then for the last layer its MLP, the heads' v inputs, k inputs, q inputs (heads
  from the last to the first), and so on back to layer 0. Within an input, senders are tried
  from the latest layer back to ``input`` (in a layer: the MLP, then heads 0, 1, ...).
* A node none of whose outgoing edges is left is not tested: all its incoming edges are
  removed (the reference's ``current_node_connected`` check).
* For every other incoming edge: remove it on top of all removals so far and measure
  ``change = sign * (m(new) - m(current))`` (the KL increase, or the drop of logit / prob
  difference), where ``m(current)`` is the metric of the circuit with every removal so far.
  If ``change`` (or ``|change|`` with ``absolute``) is below ``tau`` the edge stays removed
  and ``m(current) = m(new)``; otherwise it is restored.
* Tree-shaking afterwards (`circuitctl.graph.pruning.prune`).

Scores: each tested edge's ``change`` (untested edges: 0), so ACDC circuits rank and
evaluate like every other method's.

Speed, with identical decisions. (1) `IncrementalSearch` recomputes only the tested node and
its descendants in the current circuit, at the positions they are read at. (2) Several
candidates of one input are evaluated in one batched call and the sequential decisions are
replayed: trial k removes candidate k on top of the current circuit *and* every earlier
candidate of the batch that is predicted to be removed. Walking the batch in order, trial k
is exactly the sequential test as long as every earlier prediction was right; at the first
wrong prediction the walk stops and the next batch starts after that candidate. Predictions
come from the candidate's value in an earlier, invalidated trial, else from how often edges
from the same sender into inputs of the same kind were kept so far, else "removed" (most
edges are). Predictions only change the speed, never a decision.

Differences from the reference: our graph has no node-internal edges (the reference also
tests ``hook_q_input -> hook_q`` and ``hook_resid_mid -> hook_mlp_out``), and the current
metric is carried from the accepted trial instead of being recomputed after every sender
group (the same value up to rounding).

Long runs save their progress every `checkpoint_every_seconds` and on Ctrl-C, and
``circuitctl discover CONFIG --resume RUN_DIR`` continues from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import AcdcSettings
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.graph.pruning import prune
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult, SweepPoint
from circuitctl.patching.engine import PatchingEngine
from circuitctl.methods.acdc.incremental import EdgeSearch, IncrementalSearch, LayerwiseSearch
from circuitctl.progress import bar

METHOD = "acdc"


# ----------------------------------------------------------------------------------------
# Visiting order
# ----------------------------------------------------------------------------------------
def visit_order(graph: Graph) -> list[int]:
    """Downstream inputs in the order ACDC visits them (reverse topological, as the reference)."""
    order = [graph.logits_index]
    for layer in reversed(range(graph.spec.n_layers)):
        if graph.mlp_in_index[layer] is not None:
            order.append(graph.mlp_in_index[layer])
        for channel in ("v", "k", "q"):  # the reverse of TransformerLens's hook order
            order.extend(reversed(graph.channel_inputs(layer, channel)))
    return order


def sender_order(graph: Graph, v: int) -> list[int]:
    """The upstream nodes of input v in the order their edges are tested."""
    mlps = {u for u in graph.mlp_out_index if u is not None}
    return sorted(range(graph.prefix_len[v]), key=lambda u: (-graph.upstream_layer[u], u not in mlps, u))


def readers(graph: Graph, v: int) -> list[int]:
    """Upstream indices of the nodes that read input v (none for the logits; several heads for
    a grouped k/v input)."""
    if v == graph.logits_index:
        return []
    return [graph.upstream_index[name] for name in graph.readers_of_input(v)]


# ----------------------------------------------------------------------------------------
# One search
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """A search's state between two batches. Replaced, never changed in place, so that a
    Ctrl-C at any moment finds a consistent one to save.

    `n_ops` counts the removals (`Search.ops`) made so far: a resume replays them to rebuild
    the evaluator's state bit for bit, and continues with the same predictions, so that it
    ends with exactly the circuit and scores of an uninterrupted run.
    """

    position: int  # index into visit_order
    candidate: int  # index into that input's sender_order
    current: float  # metric of the current circuit
    removed: torch.Tensor  # bool [U, V]
    scores: torch.Tensor  # float64 [U, V]
    tested: torch.Tensor  # bool [U, V]
    n_ops: int = 0
    counts: dict = field(default_factory=lambda: {"tests": 0, "untested": 0, "trials": 0, "passes": 0})
    history: dict = field(default_factory=dict)  # (sender, input kind) -> (edges tested, edges kept)
    predicted: dict = field(default_factory=dict)  # sender -> predicted removal, for the current input

    @classmethod
    def start(cls, graph: Graph, current: float) -> "Progress":
        shape = (graph.n_upstream, graph.n_downstream)
        zeros = torch.zeros(shape, dtype=torch.bool, device="cpu")
        return cls(0, 0, current, zeros, torch.zeros(shape, dtype=torch.float64, device="cpu"), zeros.clone())

    def to_checkpoint(self, prefix: str, ops: list) -> tuple[dict, dict]:
        state = {
            "position": self.position,
            "candidate": self.candidate,
            "current": self.current,
            "counts": self.counts,
            "ops": ops[: self.n_ops],
            "history": [[u, kind, tests, kept] for (u, kind), (tests, kept) in self.history.items()],
            "predicted": [[u, guess] for u, guess in self.predicted.items()],
        }
        tensors = {f"{prefix}.removed": self.removed, f"{prefix}.scores": self.scores, f"{prefix}.tested": self.tested}
        return state, tensors

    @classmethod
    def from_checkpoint(cls, state: dict, tensors: dict, prefix: str) -> tuple["Progress", list]:
        ops = [(op[0], op[1], list(op[2])) for op in state["ops"]]
        progress = cls(
            state["position"],
            state["candidate"],
            state["current"],
            tensors[f"{prefix}.removed"].bool(),
            tensors[f"{prefix}.scores"].double(),
            tensors[f"{prefix}.tested"].bool(),
            len(ops),
            dict(state["counts"]),
            {(u, kind): (tests, kept) for u, kind, tests, kept in state["history"]},
            {u: guess for u, guess in state["predicted"]},
        )
        return progress, ops


class Search:
    """ACDC at one tau, from a `Progress` to the end, calling `on_step` after every batch."""

    def __init__(self, graph: Graph, search: EdgeSearch, settings: AcdcSettings, tau: float, sign: float, ops: list) -> None:
        self.graph = graph
        self.search = search
        self.tau = tau
        self.sign = sign
        self.absolute = settings.absolute
        self.per_pass = settings.candidates_per_pass
        self.per_evaluation = settings.trials_per_evaluation
        self.order = visit_order(graph)
        self.kind = [naming.parse_node(name).channel or naming.parse_node(name).kind for name in graph.downstream]
        self.ops = ops  # ("drop", v, []) and ("remove", v, senders), in order; append-only

    def decide(self, value: float, current: float) -> tuple[float, bool]:
        """(change, remove?) for a trial value against the current metric."""
        change = self.sign * (value - current)
        return change, (abs(change) if self.absolute else change) < self.tau

    def replay(self, n_ops: int) -> None:
        """Bring a fresh evaluator to the state after the first n_ops removals."""
        for kind, v, senders in self.ops[:n_ops]:
            if kind == "drop":
                self.search.drop(v)
            else:
                self.search.commit(v, senders)
        del self.ops[n_ops:]  # removals after the checkpoint are redone

    def run(self, progress: Progress, on_step) -> Progress:
        g = self.graph
        for position in range(progress.position, len(self.order)):
            v = self.order[position]
            candidates = sender_order(g, v)
            reading = readers(g, v)
            if reading and not bool((g.edge_mask[reading] & ~progress.removed[reading]).any()):
                # read by nothing any more: remove its inputs untested (the reference does the same)
                self.ops.append(("drop", v, []))
                self.search.drop(v)
                removed = progress.removed.clone()
                removed[: g.prefix_len[v], v] = True
                counts = {**progress.counts, "untested": progress.counts["untested"] + len(candidates)}
                progress = replace(progress, position=position + 1, candidate=0, removed=removed, counts=counts, n_ops=len(self.ops), predicted={})
                on_step(progress, len(candidates))
                continue
            if position != progress.position:
                progress = replace(progress, position=position, candidate=0, predicted={})
            while progress.candidate < len(candidates):
                progress, done = self._batch(v, candidates, progress)
                on_step(progress, done)
            progress = replace(progress, position=position + 1, candidate=0, predicted={})
        return progress

    def _batch(self, v: int, candidates: list[int], progress: Progress) -> tuple[Progress, int]:
        """Test the next candidates of input v speculatively, a few trials per batched call, and
        replay the sequential decisions."""
        chunk = candidates[progress.candidate : progress.candidate + self.per_pass]
        history, predicted = dict(progress.history), dict(progress.predicted)
        guess = [predicted.get(u, self._prior(history, u, v)) for u in chunk]
        K = len(chunk)
        ablate = torch.eye(K, dtype=torch.bool, device="cpu")
        for k in range(K):
            ablate[k, :k] = torch.tensor(guess[:k], dtype=torch.bool, device="cpu")
        current, removals = progress.current, []
        scores, tested = progress.scores.clone(), progress.tested.clone()
        values: list[float] = []
        used, passes, wrong = 0, 0, False
        # Trials are evaluated a few at a time and the walk stops at the first wrong prediction:
        # a trial's unembedding is most of its cost, and trials after a wrong guess are wasted.
        for lo in range(0, K, self.per_evaluation):
            values += self.search.trial_values(v, chunk, ablate[lo : lo + self.per_evaluation]).tolist()
            passes += 1
            for k in range(lo, len(values)):
                u = chunk[k]
                change, remove = self.decide(values[k], current)
                scores[u, v], tested[u, v] = change, True
                tests, kept = history.get((u, self.kind[v]), (0, 0))
                history[(u, self.kind[v])] = (tests + 1, kept + (not remove))
                used = k + 1
                if remove:
                    removals.append(u)
                    current = values[k]
                if remove != guess[k]:
                    wrong = True  # later trials assumed the other outcome: they are re-tested in the next batch
                    break
            if wrong:
                break
        # Each invalidated trial k still measured candidate k's effect on top of the trials'
        # shared speculative circuit (the last trial before it that assumed a removal): a good prediction.
        base = current if not any(guess[:used]) else values[max(i for i in range(used) if guess[i])]
        for k in range(used, len(values)):
            predicted[chunk[k]] = self.decide(values[k], base)[1]
            if guess[k]:
                base = values[k]
        if removals:
            self.ops.append(("remove", v, removals))
            self.search.commit(v, removals)
        removed = progress.removed.clone()
        removed[removals, v] = True
        counts = dict(progress.counts)
        counts["tests"] += used
        counts["trials"] += len(values)
        counts["passes"] += passes
        new = replace(
            progress,
            candidate=progress.candidate + used,
            current=current,
            removed=removed,
            scores=scores,
            tested=tested,
            n_ops=len(self.ops),
            counts=counts,
            history=history,
            predicted=predicted,
        )
        return new, used

    def _prior(self, history: dict, u: int, v: int) -> bool:
        """Prediction without a measurement: removed, unless most tested edges from u into
        inputs of v's kind were kept."""
        tests, kept = history.get((u, self.kind[v]), (0, 0))
        return not (tests and 2 * kept > tests)


# ----------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------
def make_search(context: DiscoveryContext, engine: PatchingEngine, settings: AcdcSettings) -> tuple[EdgeSearch, str]:
    from circuitctl.methods.acdc.nodes import NodeComputer, unsupported_reason

    reason = unsupported_reason(context.adapter.cfg)
    if context.graph.spec.grouped:
        reason = "grouped-query attention"
    if settings.evaluator == "incremental" and reason:
        raise UsageError(f"method.evaluator: 'incremental' cannot handle this model ({reason}); use 'auto' or 'layerwise'")
    if settings.evaluator == "layerwise" or reason:
        return LayerwiseSearch(engine), "layerwise" + (f" (model has {reason})" if reason else "")
    if settings.evaluator == "auto" and not incremental_fits(context, engine):
        return LayerwiseSearch(engine), "layerwise (the incremental tables exceed the cache budget: batches are streamed)"
    return IncrementalSearch(engine, NodeComputer(context.adapter)), "incremental"


def incremental_fits(context: DiscoveryContext, engine: PatchingEngine) -> bool:
    """Whether the incremental evaluator's tables (every example's clean, ablation, difference and
    current node outputs, beside the engine's cached runs) fit the batch cache's device budget; if
    not, the layerwise evaluator streams the batches through the cache instead."""
    from circuitctl import distributed
    from circuitctl.patching.cache import BatchCache

    cfg, graph = context.adapter.cfg, context.graph
    examples = distributed.shard(context.data).n
    per_example = context.data.clean.shape[1] * cfg.d_model * context.adapter.dtype.itemsize
    tables = examples * per_example * (4 * graph.n_upstream + cfg.n_layers + 1)
    return tables <= BatchCache(context.adapter.device, engine.cache_gib).device_budget


def tau_label(tau: float) -> str:
    return f"tau-{tau:g}"


class _Sweep:
    """The sweep's progress: (info, progress, ops) of every finished tau, and the active one.
    `snapshot` is what the checkpoint holds (`circuitctl.checkpoint.Autosave` writes it)."""

    def __init__(self, taus: list[float]) -> None:
        self.taus = taus
        self.finished: list[tuple[dict, Progress, list]] = []
        self.active: tuple[int, Progress, list] | None = None  # (tau index, progress, ops)

    def snapshot(self) -> tuple[dict, dict]:
        state: dict = {"taus": self.taus, "finished": [], "active": None}
        tensors = {}
        for i, (info, progress, ops) in enumerate(self.finished):
            entry, t = progress.to_checkpoint(f"finished{i}", ops)
            state["finished"].append({"info": info, **entry})
            tensors.update(t)
        if self.active is not None:
            index, progress, ops = self.active
            entry, t = progress.to_checkpoint("active", ops)
            state["active"] = {"tau_index": index, **entry}
            tensors.update(t)
        return state, tensors

    def restore(self, state: dict, tensors: dict, where) -> None:
        if state["taus"] != self.taus:  # the config fingerprint covers this already; a cheap guard
            raise UsageError(f"{where}: the checkpoint is for tau {state['taus']}, not {self.taus}")
        for i, entry in enumerate(state["finished"]):
            progress, ops = Progress.from_checkpoint(entry, tensors, f"finished{i}")
            self.finished.append((entry["info"], progress, ops))
        if state["active"] is not None:
            progress, ops = Progress.from_checkpoint(state["active"], tensors, "active")
            self.active = (state["active"]["tau_index"], progress, ops)


def discover(context: DiscoveryContext, settings: AcdcSettings) -> DiscoveryResult:
    graph = context.graph
    taus = list(settings.tau) if isinstance(settings.tau, list) else [settings.tau]
    engine = context.engine(settings.batch_size, keep_cache=True)
    sweep = _Sweep(taus)
    autosave = Autosave(context.checkpoint, METHOD, settings.checkpoint_every_seconds, sweep.snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        sweep.restore(*loaded, context.checkpoint.dir)
    sign = context.metric.importance_sign
    scale = metric_gap(engine) if settings.tau_mode == "relative" else 1.0
    try:
        for index in range(len(sweep.finished), len(taus)):
            tau = taus[index] * scale
            search, evaluator = make_search(context, engine, settings)
            if sweep.active is not None and sweep.active[0] == index:
                _, progress, ops = sweep.active
            else:
                progress, ops = Progress.start(graph, search.current_value()), []
            runner = Search(graph, search, settings, tau, sign, ops)
            runner.replay(progress.n_ops)
            sweep.active = (index, progress, ops)
            with bar(f"acdc {tau_label(tau)}", graph.n_edges) as advance:
                advance(int(progress.tested.sum()) + progress.counts["untested"])

                def on_step(new: Progress, done: int) -> None:
                    sweep.active = (index, new, ops)
                    advance(done)
                    autosave.maybe_save()

                progress = runner.run(progress, on_step)
            sweep.finished.append(({"tau": taus[index], "tau_abs": tau, "evaluator": evaluator}, progress, ops))
            sweep.active = None
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise autosave.interrupted("ACDC") from None
    points = [_point(graph, info, progress) for info, progress, _ in sweep.finished]
    first = points[0]
    result = DiscoveryResult(
        scores=first.scores,
        membership=first.membership,
        forward_passes=sum(p.forward_passes for p in points),
        extra=first.extra if len(points) == 1 else {"taus": taus, "points": [p.extra for p in points]},
    )
    if isinstance(settings.tau, list):
        result.sweep = points
    return result


def metric_gap(engine: PatchingEngine) -> float:
    """|m(full) - m(every edge ablated)|: the effect a relative tau is a fraction of."""
    from circuitctl.metrics.faithfulness import normalized_faithfulness

    m_full, m_empty = engine.full_and_empty()
    gap = abs(m_full - m_empty)
    if normalized_faithfulness(m_full, m_full, m_empty) is None:  # no gap beyond float32 noise
        raise UsageError(
            f"method.tau_mode: relative needs a clean-ablated gap, but the metric is {m_full:.6g} with and without "
            "the edges (the task shows no effect); use tau_mode: absolute"
        )
    return gap


def _point(graph: Graph, info: dict, progress: Progress) -> SweepPoint:
    membership = prune(graph.edge_mask & ~progress.removed, graph)
    counts = progress.counts
    extra = {
        **info,
        "edges_tested": counts["tests"],
        "edges_removed_untested": counts["untested"],
        "edges_before_pruning": int((graph.edge_mask & ~progress.removed).sum()),
        "edges_after_pruning": int(membership.sum()),
        "trials": counts["trials"],
        "batched_evaluations": counts["passes"],
        "metric_final": progress.current,
    }
    return SweepPoint(
        label=tau_label(info["tau"]),
        params={"tau": info["tau"]},
        scores=progress.scores.float() * graph.edge_mask,
        membership=membership,
        forward_passes=2.0 + counts["trials"],
        extra=extra,
    )
