"""Exact edge activation patching: the reference every other method is compared with.

The effect of an edge is the metric with only that edge ablated minus the clean metric.
An edge's ablation only changes its downstream node's input, so each patched pass starts
at that node's layer from the cached clean activations, and the edges into one layer are
patched together as a batch of single-edge circuits. Under torchrun each rank patches its
share of the examples and the effect sums are all-reduced.

The unit of work is one chunk of edges on one batch of examples. The float64 effect sums of
the finished units are saved every `checkpoint_every_seconds` and on Ctrl-C (not under torchrun:
resume runs on one process), and ``circuitctl discover CONFIG --resume RUN_DIR`` continues with
the next chunk of the same batch: the same additions in the same order, so the same scores,
bit for bit, as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from circuitctl import distributed
from circuitctl.checkpoint import Autosave
from circuitctl.config.methods import ExactSettings
from circuitctl.errors import UsageError
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.patching.engine import BatchState, PatchingEngine
from circuitctl.progress import bar
from circuitctl.tasks.data import TaskData

METHOD = "exact"


def single_edge_chunks(graph, chunk: int):
    """Lists of (u, v) edges, each list within one downstream layer, at most `chunk` long."""
    current, layer = [], None
    for v in range(graph.n_downstream):
        for u in range(graph.prefix_len[v]):
            if current and (len(current) == chunk or graph.downstream_layer[v] != layer):
                yield current
                current = []
            current.append((u, v))
            layer = graph.downstream_layer[v]
    if current:
        yield current


@dataclass(frozen=True)
class _Progress:
    """Effect sums over the finished (batch, chunk) units of this process's examples. Replaced
    after every unit, never changed in place, so that a Ctrl-C at any moment finds a consistent one.

    Batches are ranges of examples: `examples_done` examples are finished with every chunk, and
    the batch in progress holds the next `batch` examples (0: none), of which the first
    `chunks_done` chunks are finished."""

    examples_done: int
    batch: int
    chunks_done: int
    sums: torch.Tensor  # float64 [U, V]

    def add(self, us: torch.Tensor, vs: torch.Tensor, effects: torch.Tensor, batch: int, n_chunks: int) -> "_Progress":
        """The progress after one more chunk of the batch in progress (of `batch` examples)."""
        sums = self.sums.clone()
        sums[us, vs] += effects
        if self.chunks_done + 1 == n_chunks:  # the batch is finished
            return _Progress(self.examples_done + batch, 0, 0, sums)
        return _Progress(self.examples_done, batch, self.chunks_done + 1, sums)

    def to_checkpoint(self, n_examples: int, n_chunks: int) -> tuple[dict, dict]:
        state = {
            "examples_done": self.examples_done,
            "batch": self.batch,
            "chunks_done": self.chunks_done,
            "n_examples": n_examples,
            "n_chunks": n_chunks,
        }
        return state, {"sums": self.sums}

    @classmethod
    def restore(cls, state: dict, tensors: dict, n_examples: int, n_chunks: int, shape: tuple, where) -> "_Progress":
        sums = tensors.get("sums")
        if (
            state.get("n_examples") != n_examples
            or state.get("n_chunks") != n_chunks
            or sums is None
            or tuple(sums.shape) != tuple(shape)
        ):
            raise UsageError(
                f"{where}: the checkpoint does not fit this model, task and candidates_per_pass "
                f"({state.get('n_examples')} examples and {state.get('n_chunks')} chunks of edges saved, "
                f"{n_examples} and {n_chunks} now); delete it to start over"
            )
        return cls(int(state["examples_done"]), int(state["batch"]), int(state["chunks_done"]), sums.double())


def _batches(engine: PatchingEngine, data: TaskData, progress: _Progress) -> Iterator[BatchState]:
    """The batches still to patch, as `PatchingEngine.states` makes them (with its batch size,
    halved on out-of-memory errors): first the batch in progress, with the same examples as
    when it was saved, then the unfinished examples."""
    start = progress.examples_done
    if progress.batch:
        yield engine.batch_state(data.slice(start, start + progress.batch))
        start += progress.batch
    yield from engine.sizer.map(data.slice(start, data.n), engine.batch_state)


def _chunk_effects(engine: PatchingEngine, state: BatchState, clean: torch.Tensor, edges: list) -> tuple[torch.Tensor, ...]:
    """(us, vs, effects [k]): each edge (us[i], vs[i]) of the chunk ablated alone, its effect on the
    metric summed over the batch (float64; `clean`: the clean metric per example)."""
    graph = engine.graph
    us, vs = (torch.tensor(x, device="cpu") for x in zip(*edges))
    masks = torch.zeros(len(edges), graph.n_upstream, graph.n_downstream, dtype=torch.bool, device="cpu")
    masks[torch.arange(len(edges), device="cpu"), us, vs] = True
    values = engine.patched_metric(state, masks).double()  # [k, B]
    return us, vs, (values - clean).sum(1).cpu()


def discover(context: DiscoveryContext, settings: ExactSettings) -> DiscoveryResult:
    graph = context.graph
    engine = context.engine(settings.batch_size)
    chunks = list(single_edge_chunks(graph, settings.candidates_per_pass))
    local = distributed.shard(context.data)
    checkpoint = context.checkpoint if distributed.world_size() == 1 else None
    progress = _Progress(0, 0, 0, torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float64, device="cpu"))

    def snapshot() -> tuple[dict, dict]:
        return progress.to_checkpoint(local.n, len(chunks))

    autosave = Autosave(checkpoint, METHOD, settings.checkpoint_every_seconds, snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        progress = _Progress.restore(*loaded, local.n, len(chunks), progress.sums.shape, checkpoint.dir)
    try:
        with bar("exact patching", engine.n_local_batches() * len(chunks)) as advance:
            advance(-(-progress.examples_done // settings.batch_size) * len(chunks) + progress.chunks_done)
            for state in _batches(engine, local, progress):
                clean = engine.metric_of_logits(state.clean.logits, state).double()
                for edges in chunks[progress.chunks_done :]:
                    us, vs, effects = _chunk_effects(engine, state, clean, edges)
                    progress = progress.add(us, vs, effects, state.n, len(chunks))
                    advance()
                    autosave.maybe_save()
    except KeyboardInterrupt:
        if checkpoint is None:
            raise
        raise autosave.interrupted("exact patching") from None
    sums = distributed.all_reduce_sum(progress.sums)
    scores = (context.metric.importance_sign * sums / context.data.n).float()
    return DiscoveryResult(scores=scores, forward_passes=2 + graph.n_edges)
