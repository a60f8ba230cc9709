"""Where the engine's batches wait between uses: on the device, on the host, or recomputed.

An evaluation or an ACDC search goes over every batch many times, each time needing the batch's
clean run and ablation values ([U, B, P, d] tensors: about 2 GiB per 128-token example of an
8B model). Keeping all of them on the accelerator limits the number of examples, so the cache
keeps batches on the device up to a budget, the next ones on the host (pinned, when there is a
GPU) up to a host budget, and recomputes the rest when they are used. Every batch gives exactly
the same tensors whichever way it is kept, so results do not depend on the budgets.

Budgets: ``cache_gib`` in the run config (device), default half the GPU's free memory on CUDA
and no limit elsewhere (the host is then the device); the host budget is half the available RAM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

GIB = 2**30


def available_host_bytes() -> float:
    """Physical memory available now (Linux; unknown elsewhere: no limit)."""
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def state_bytes(state) -> int:
    tensors = [state.clean.outputs, state.clean.resid, state.clean.logits, state.ablation_outputs, *state.extras.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class CachedBatch:
    """One batch as the cache keeps it; `get()` gives its state on the model's device."""

    where: str  # device | host | recompute
    state: object | None  # the BatchState (on the device or the host), None when recomputed
    recompute: Callable[[], object]
    device: torch.device

    def get(self):
        if self.where == "device":
            return self.state
        if self.where == "host":
            return self.state.to(self.device)
        return self.recompute()


class BatchCache:
    def __init__(self, device: torch.device, device_gib: float | None = None, host_gib: float | None = None) -> None:
        self.device = torch.device(device)
        if device_gib is not None:
            self.device_budget = device_gib * GIB
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.device_budget = 0.5 * free
        else:
            self.device_budget = float("inf")  # the host is the device: nothing to gain by moving
        self.host_budget = host_gib * GIB if host_gib is not None else 0.5 * available_host_bytes()
        self.used = {"device": 0, "host": 0}
        self.counts = {"device": 0, "host": 0, "recompute": 0}

    def keep(self, state, recompute: Callable[[], object]) -> CachedBatch:
        size = state_bytes(state)
        if self.used["device"] + size <= self.device_budget:
            where, kept = "device", state
        elif self.used["host"] + size <= self.host_budget:
            where, kept = "host", state.to(torch.device("cpu"), pin=torch.cuda.is_available())
        else:
            where, kept = "recompute", None
        if where != "recompute":
            self.used[where] += size
        self.counts[where] += 1
        return CachedBatch(where, kept, recompute, self.device)

    def note(self) -> str | None:
        """A line for the run's notes when not every batch stayed on the device."""
        if not self.counts["host"] and not self.counts["recompute"]:
            return None
        return (
            f"activation cache: {self.counts['device']} batch(es) kept on the device ({self.used['device'] / GIB:.1f} GiB), "
            f"{self.counts['host']} on the host, {self.counts['recompute']} recomputed at every use (cache_gib sets the device budget)"
        )
