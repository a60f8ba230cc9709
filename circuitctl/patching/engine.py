"""The patching engine: batches of clean runs and ablation values, and the metric of patched runs.

It owns what every patched evaluation shares, whatever a circuit is made of:

* the batches (this rank's share under torchrun, cached when asked), each with its clean run
  (`Capture`: every node's output, the residual streams, the logits at the answer positions)
  and, for edge-level patching, the node outputs that ablated edges carry:
  resample (the paired corrupt prompt), zero, or mean (over the dataset, per position or not);
* `values`: the dataset-mean metric of K patched runs, one loop for every kind of circuit: a
  kind supplies only its patched logits (`circuitctl.circuits`). Metrics are computed in
  float32 whatever the model's dtype and summed in float64; NaN or infinite logits stop the
  run; a batch that runs out of accelerator memory is retried in halves (`circuitctl.batching`);
  under torchrun the sums are all-reduced, so every rank gets the single-process means.

Evaluating any set of edge circuits costs one clean and one ablation forward per batch (cached
when asked) plus one patched forward per circuit, whatever the circuits' sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from circuitctl import distributed
from circuitctl.batching import BatchSizer
from circuitctl.patching.cache import BatchCache
from circuitctl.config.schema import AblationConfig
from circuitctl.errors import UsageError
from circuitctl.metrics.metrics import Metric
from circuitctl.models.adapter import Capture, ModelAdapter
from circuitctl.tasks.data import TaskData


@dataclass
class BatchState:
    """One batch: its examples, its clean run, what ablated edges carry, and per-kind extras."""

    batch: TaskData
    clean: Capture
    ablation_outputs: torch.Tensor | None  # [U, B or 1, P, d]; None when no edge-level patching needs it
    # ablation values of other kinds of units (e.g. MLP neurons, SAE features): dim 1 is the
    # batch dimension (size 1: the same for every example), so that slices stay aligned
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.batch.n

    def slice(self, start: int, stop: int) -> "BatchState":
        """Examples start..stop-1 of this batch (views, no copies)."""
        clean = Capture(self.clean.outputs[:, start:stop], self.clean.resid[:, start:stop], self.clean.logits[start:stop])
        extras = {key: _rows(value, start, stop) for key, value in self.extras.items()}
        return BatchState(self.batch.slice(start, stop), clean, _rows(self.ablation_outputs, start, stop), extras)

    def to(self, device: torch.device, pin: bool = False) -> "BatchState":
        """This batch on `device` (pinned host memory with `pin`, for fast copies back to a GPU)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.pin_memory() if pin else t

        clean = Capture(move(self.clean.outputs), move(self.clean.resid), move(self.clean.logits))
        extras = {key: move(value) for key, value in self.extras.items()}
        return BatchState(self.batch.to(device), clean, move(self.ablation_outputs), extras)


def _rows(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Examples start..stop-1 along dim 1 (a size-1 dim 1 is shared by every example)."""
    if tensor is None or tensor.shape[1] == 1:
        return tensor
    return tensor[:, start:stop]


class PatchingEngine:
    def __init__(
        self,
        adapter: ModelAdapter,
        data: TaskData,
        metric: Metric,
        ablation: AblationConfig,
        batch_size: int,
        keep_cache: bool = False,
        node_ablation: bool = True,
        cache_gib: float | None = None,
    ) -> None:
        self.adapter = adapter
        self.graph = adapter.graph
        self.data = data
        self.metric = metric
        self.ablation = ablation
        self.batch_size = batch_size
        self.keep_cache = keep_cache
        self.node_ablation = node_ablation  # False: the batches carry no edge-level ablation outputs
        self.cache_gib = cache_gib  # device budget of the batch cache (`circuitctl.patching.cache`)
        self.cache: BatchCache | None = None
        self.sizer = BatchSizer(batch_size, "the patching engine")  # halves on out-of-memory errors
        self._cache: _Batches | None = None
        self._local_cache: _Batches | None = None
        self._means: torch.Tensor | None = None
        self._clean_value: float | None = None

    # -- activations ---------------------------------------------------------------------
    def _mean_outputs(self) -> torch.Tensor:
        """[U, 1, P, d] mean node outputs over the clean prompts (real tokens only)."""
        if self._means is None:
            dims = (1,) if self.ablation.per_position else (1, 2)
            U, P, d = self.graph.n_upstream, self.data.clean.shape[1], self.adapter.cfg.d_model
            shape = (U, 1, P if self.ablation.per_position else 1, d)
            # float32 sums (a bfloat16 sum over a dataset loses the mean's low bits), one all-reduce
            total = torch.zeros(shape, dtype=torch.float32, device=self.adapter.device)
            count = torch.zeros((1, 1, shape[2], 1), dtype=torch.float32, device=self.adapter.device)

            def sums(batch: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
                batch = batch.to(self.adapter.device)
                outputs = self.adapter.run(batch.clean, batch.answer_positions).outputs.float()
                real = batch.real_tokens.float()[None, :, :, None]  # [1, B, P, 1]
                return (outputs * real).sum(dims, keepdim=True), real.sum(dims, keepdim=True)

            for s, c in self.sizer.map(distributed.shard(self.data), sums):
                total += s
                count += c
            total, count = distributed.all_reduce_sum(total), distributed.all_reduce_sum(count)
            means = (total / count.clamp(min=1)).to(self.adapter.dtype)
            self._means = means.expand(-1, 1, P, -1)
        return self._means

    def ablation_outputs(self, batch: TaskData) -> torch.Tensor:
        """What ablated edges carry for this batch: [U, B, P, d] (resample) or [U, 1, P, d]."""
        kind = self.ablation.type
        if kind == "resample":
            return self.adapter.run(batch.corrupt, batch.answer_positions).outputs
        if kind == "zero":
            g, cfg = self.graph, self.adapter.cfg
            return torch.zeros(g.n_upstream, 1, batch.clean.shape[1], cfg.d_model, dtype=self.adapter.dtype, device=self.adapter.device)
        return self._mean_outputs()

    def batch_state(self, batch: TaskData) -> BatchState:
        """The clean run and the ablation outputs of one batch (what `states` yields for it)."""
        batch = batch.to(self.adapter.device)
        clean = self.adapter.run(batch.clean, batch.answer_positions)
        check_finite(clean.logits, "the clean run")
        return BatchState(batch, clean, self.ablation_outputs(batch) if self.node_ablation else None)

    def states(self) -> Iterator[BatchState]:
        """Every batch of the dataset (cached with keep_cache). For consumers that sum over the
        whole dataset themselves; under torchrun each rank then computes everything."""
        if self._cache is None:
            self._cache = self._fill(self.data)
        yield from self._cache.batches()

    def local_states(self) -> Iterator[BatchState]:
        """This rank's batches (all of them in a single process): sums over them must be
        all-reduced (`distributed.all_reduce_sum`) and divided by `data.n`."""
        if distributed.world_size() == 1:
            yield from self.states()
            return
        if self._local_cache is None:
            self._local_cache = self._fill(distributed.shard(self.data))
        yield from self._local_cache.batches()

    def _fill(self, data: TaskData) -> "_Batches":
        return _Batches(self, data)

    def n_local_batches(self) -> int:
        """How many batches `local_states` yields at the starting batch size (for progress bars)."""
        return -(-distributed.shard(self.data).n // self.batch_size)

    # -- metric values -------------------------------------------------------------------
    def metric_of_logits(self, logits: torch.Tensor, state: BatchState) -> torch.Tensor:
        """Per-example metric [B] in float32 (whatever the model's dtype)."""
        return self.metric(logits.float(), state.batch, state.clean.logits.float())

    def patched_values(self, state: BatchState, logits_of: Callable[[BatchState], torch.Tensor]) -> torch.Tensor:
        """Per-example metric [K, B] of K patched runs of one batch, `logits_of(piece) -> [K, b, vocab]`.

        Runs the batch in pieces of at most `sizer.size` examples, halving on out-of-memory."""

        def run(piece: BatchState) -> torch.Tensor:
            logits = logits_of(piece)
            check_finite(logits, "a patched run")
            return torch.stack([self.metric_of_logits(lg, piece) for lg in logits])

        return torch.cat(list(self.sizer.map(state, run)), dim=1)

    def values(
        self,
        logits_of: Callable[[BatchState, torch.Tensor], torch.Tensor],
        masks: torch.Tensor,
        chunk: int = 8,
        on_batch: Callable[[], None] | None = None,
        prepare: Callable[[BatchState], BatchState] | None = None,
        per_example: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dataset-mean metric [K] (float64) of K patched runs described by `masks` [K, ...].

        `logits_of(piece, masks[lo:hi]) -> [k, b, vocab]` runs one piece of a batch with `chunk`
        masks at a time; `prepare(state)` adds what a kind of circuit needs per batch (its extras).
        `per_example`: a float64 [K, N] tensor that also receives every example's value (row order
        of `data`; under torchrun every rank ends with all of them), from the same runs."""
        K = masks.shape[0]
        totals = torch.zeros(K, dtype=torch.float64, device="cpu")
        row = distributed.shard_range(self.data.n)[0]  # this rank's first example
        if per_example is not None:
            per_example.zero_()
        for state in self.local_states():
            if prepare is not None:
                state = prepare(state)
            for lo in range(0, K, chunk):
                part = masks[lo : lo + chunk].to(self.adapter.device)
                values = self.patched_values(state, lambda piece: logits_of(piece, part))
                totals[lo : lo + chunk] += values.double().sum(1).cpu()
                if per_example is not None:
                    per_example[lo : lo + chunk, row : row + state.n] = values.double().cpu()
            row += state.n
            if on_batch:
                on_batch()
        if per_example is not None:
            per_example.copy_(distributed.all_reduce_sum(per_example))
        return distributed.all_reduce_sum(totals) / self.data.n

    # -- edge patching (exact patching, ACDC) ---------------------------------------------------
    def edge_logits(self, piece: BatchState, ablated: torch.Tensor) -> torch.Tensor:
        """Logits [K, b, vocab] of one piece with each of K ablated-edge masks [K, U, V] applied."""
        return self.adapter.patched_logits(piece.clean, piece.ablation_outputs, ablated, piece.batch.answer_positions)

    def patched_metric(self, state: BatchState, ablated: torch.Tensor) -> torch.Tensor:
        """Per-example metric [K, B] of one batch with each of K ablated-edge masks [K, U, V] applied."""
        ablated = ablated.to(self.adapter.device)
        return self.patched_values(state, lambda piece: self.edge_logits(piece, ablated))

    def metric_values(self, ablated: torch.Tensor, chunk: int = 8, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
        """Mean metric over the dataset for each of K circuits given as ablated-edge masks [K, U, V]."""
        return self.values(self.edge_logits, ablated, chunk, on_batch)

    def circuit_values(self, keep: torch.Tensor, chunk: int = 8, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
        """Mean metric for each edge circuit given as kept-edge masks [K, U, V]."""
        return self.metric_values(self.graph.edge_mask.to(keep.device)[None] & ~keep, chunk, on_batch)

    def full_and_empty(self) -> tuple[float, float]:
        """m(M) (nothing ablated) and m(empty) (every edge ablated)."""
        return self.clean_value(), float(self.metric_values(self.graph.edge_mask[None].clone())[0])

    def clean_values_per_example(self) -> torch.Tensor:
        """The full model's metric on every example: float64 [N] (all of them under torchrun too)."""
        values = torch.zeros(self.data.n, dtype=torch.float64, device="cpu")
        row = distributed.shard_range(self.data.n)[0]
        for state in self.local_states():
            values[row : row + state.n] = self.metric_of_logits(state.clean.logits, state).double().cpu()
            row += state.n
        return distributed.all_reduce_sum(values)

    def clean_value(self) -> float:
        if self._clean_value is None:
            total = torch.zeros((), dtype=torch.float64, device="cpu")
            for state in self.local_states():
                total += self.metric_of_logits(state.clean.logits, state).double().sum().cpu()
            self._clean_value = float(distributed.all_reduce_sum(total)) / self.data.n
        return self._clean_value


class _Batches:
    """The batches of one dataset share, computed on first use; with keep_cache, kept for the
    next uses in the engine's `BatchCache` (on the device, on the host, or recomputed)."""

    def __init__(self, engine: PatchingEngine, data: TaskData) -> None:
        self.engine, self.data = engine, data
        self.kept: list | None = None

    def batches(self) -> Iterator[BatchState]:
        engine = self.engine
        if self.kept is not None:
            for entry in self.kept:
                yield entry.get()
            return
        if not engine.keep_cache:
            yield from engine.sizer.map(self.data, engine.batch_state)
            return
        if engine.cache is None:
            engine.cache = BatchCache(engine.adapter.device, engine.cache_gib)
        kept = []
        for piece, state in engine.sizer.map(self.data, lambda piece: (piece, engine.batch_state(piece))):
            kept.append(engine.cache.keep(state, lambda piece=piece: engine.batch_state(piece)))
            yield state
        self.kept = kept
        note_text = engine.cache.note()
        if note_text:
            from circuitctl.batching import note

            note(note_text)


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise UsageError(f"the model produced NaN or infinite logits in {what}; check the weights and the dtype")
