"""What every discovery method receives and returns.

Every method has one signature, ``discover(context, settings) -> DiscoveryResult``, and returns
scores over a circuit space (`circuitctl.circuits`: edges by default; nodes, neurons,
per-position edges or nodes, SAE features); choosing the circuit is a separate step
(`circuitctl.circuits.selection`), so all methods are selected, evaluated, written and drawn by
the same code (`circuitctl.runner`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from circuitctl.checkpoint import Checkpoint
from circuitctl.config.methods import METHODS, MethodSettings
from circuitctl.config.schema import AblationConfig
from circuitctl.graph.graph import Graph
from circuitctl.metrics.metrics import Metric
from circuitctl.models.adapter import ModelAdapter
from circuitctl.patching.engine import PatchingEngine
from circuitctl.tasks.data import TaskData


@dataclass
class DiscoveryContext:
    adapter: ModelAdapter
    data: TaskData
    metric: Metric
    ablation: AblationConfig
    seed: int = 0
    run_dir: Path | None = None  # for checkpoints of long methods
    checkpoint: Checkpoint | None = None  # where long methods save resumable progress (None: no saving)
    resume: bool = False  # continue from `checkpoint` instead of starting over
    config_dir: Path | None = None  # where the config's relative paths (e.g. SAE directories) are read from
    cache_gib: float | None = None  # device budget of the engines' batch caches (`circuitctl.patching.cache`)

    @property
    def graph(self) -> Graph:
        return self.adapter.graph

    def engine(self, batch_size: int, keep_cache: bool = False) -> PatchingEngine:
        return PatchingEngine(self.adapter, self.data, self.metric, self.ablation, batch_size, keep_cache, cache_gib=self.cache_gib)


@dataclass
class DiscoveryResult:
    """Scores of the units of a circuit space (positive = removing the unit hurts the
    behaviour) and, for methods that decide membership themselves, their circuit."""

    scores: torch.Tensor  # float32, shaped like space.mask (edges: [U, V], 0 where there is no edge)
    membership: torch.Tensor | None = None  # bool, shaped like scores
    space: Any = None  # a `circuitctl.circuits.space.CircuitSpace`; None: the model's edge graph
    forward_passes: float = 0.0  # forward-pass equivalents over the dataset, for reports
    extra: dict[str, Any] = field(default_factory=dict)
    # extra files for the run directory: name -> JSON-able data, or text (a ".dot" is also drawn as SVG)
    files: dict[str, Any] = field(default_factory=dict)
    # a sweep (e.g. ACDC over several tau): one circuit per point, each written to its own subdirectory
    sweep: list[SweepPoint] | None = None


@dataclass
class SweepPoint:
    """One circuit of a sweep over a method parameter."""

    label: str  # subdirectory name, e.g. "tau-0.01"
    params: dict[str, Any]  # the swept parameter(s), e.g. {"tau": 0.01}
    scores: torch.Tensor  # shaped like the result's space.mask
    membership: torch.Tensor | None = None
    forward_passes: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_method(context: DiscoveryContext, settings: MethodSettings) -> DiscoveryResult:
    info = METHODS.get(settings.name)
    module_name, function_name = info.implementation.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return function(context, settings)
