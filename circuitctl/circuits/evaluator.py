"""The metric of circuits of any kind, with every unit outside them ablated: one loop for all kinds.

The engine (`circuitctl.patching.engine`) supplies the batches (this rank's share under
torchrun), the out-of-memory halving, the non-finite check, float32 metrics and float64 sums
and the configured ablation; a space's `Patcher` supplies only its patched logits.
"""

from __future__ import annotations

from typing import Callable

import torch

from circuitctl.patching.engine import BatchState, PatchingEngine


class CircuitEvaluator:
    def __init__(self, space, adapter, data, metric, ablation, batch_size: int, cache_gib: float | None = None) -> None:
        self.space = space
        self.engine = PatchingEngine(
            adapter, data, metric, ablation, batch_size, keep_cache=True, node_ablation=space.needs_node_ablation, cache_gib=cache_gib
        )
        self.patcher = space.patcher(self.engine)

    @property
    def n_batches(self) -> int:
        return self.engine.n_local_batches()

    def _prepare(self, state: BatchState) -> BatchState:
        return self.patcher.prepare(state)

    def circuit_values(
        self, keep: torch.Tensor, on_batch: Callable[[], None] | None = None, per_example: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dataset-mean metric [K] (float64) of K circuits given as kept-unit masks [K, *space.mask.shape].
        `per_example`, a float64 [K, N] tensor, also receives every example's value (same runs)."""
        keep = keep & self.space.mask.to(keep.device)
        return self.engine.values(self.patcher.logits, keep, self.space.circuits_per_pass, on_batch, self._prepare, per_example)

    def per_example_values(self, keep: torch.Tensor, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
        """The metric of K circuits on every example: float64 [K, N] (N = data.n, in data's order)."""
        values = torch.zeros(keep.shape[0], self.engine.data.n, dtype=torch.float64, device="cpu")
        self.circuit_values(keep, on_batch, values)
        return values

    def full_and_empty_per_example(self) -> torch.Tensor:
        """m(M) and m(empty) on every example: float64 [2, N]."""
        empty = torch.zeros((1, *self.space.mask.shape), dtype=torch.bool, device="cpu")
        return torch.cat([self.engine.clean_values_per_example()[None], self.per_example_values(empty)])

    def full_and_empty(self) -> tuple[float, float]:
        """m(M) (nothing ablated) and m(empty) (every unit ablated)."""
        empty = torch.zeros((1, *self.space.mask.shape), dtype=torch.bool, device="cpu")
        return self.engine.clean_value(), float(self.circuit_values(empty)[0])
