"""What a circuit is made of: the `CircuitSpace` protocol, one implementation per kind.

A *space* says what the units of a circuit are and everything that depends on that:

* ``mask``: a bool tensor whose shape is the shape of the space's scores and membership
  tensors, True where a unit exists (edges [U, V]; nodes [U]; neurons [L, d_mlp]; per-position
  edges [G, G, U, V] or nodes [G, U]; SAE features and error nodes [N]);
* the units' names (`unit_names`, from `circuitctl.graph.naming`), tree-shaking (`prune`),
  the nodes a circuit touches (`nodes_in`);
* its entries in a circuit file (`entries` / `read`; the file's envelope is
  `circuitctl.circuits.record`), its MIB / EAP-IG file when that format has one (`mib`), its
  Graphviz drawing (`dot`);
* its evaluator: `patcher(engine)` gives a `Patcher`, the only kind-specific part of running
  the model with every unit outside a circuit ablated (`circuitctl.circuits.evaluator`).

Selection (top-n / threshold / fraction of ``mask``'s units), evaluation, writing and drawing
then go through one path for every kind (`circuitctl.runner`, `circuitctl.evaluation`).
Adding a kind of node means one new space module plus one entry in `circuitctl.circuits.SPACES`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from circuitctl.patching.engine import BatchState, PatchingEngine


class Patcher(Protocol):
    """Runs batches with the units outside K circuits ablated."""

    def prepare(self, state: BatchState) -> BatchState:
        """The batch with what this kind needs added (its `extras`: e.g. ablated neuron activations)."""
        ...

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, vocab] at the answer positions; keep: bool [K, *mask.shape] (units kept)."""
        ...


class CircuitSpace(Protocol):
    kind: str  # the circuit file's discriminator: edge | node | neuron | positional_edge | positional_node | feature
    unit: str  # what the counts count: edges | nodes | neurons | features
    needs_node_ablation: bool  # whether its patcher reads the engine's edge-level ablation outputs
    circuits_per_pass: int  # circuits patched together in one batched forward

    @property
    def mask(self) -> torch.Tensor: ...

    @property
    def n_total(self) -> int: ...

    def info(self) -> dict:
        """The circuit file's ``space`` entry: the kind and what is needed to rebuild the space."""
        ...

    def unit_names(self) -> list[str]:
        """The names of the units at ``mask.nonzero()``, in that order."""
        ...

    def prune(self, membership: torch.Tensor) -> torch.Tensor: ...

    def nodes_in(self, membership: torch.Tensor) -> set[str]: ...

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        """The circuit file's ``nodes`` and ``edges`` (and ``neurons``) for these scores."""
        ...

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, membership) from a circuit file's entries; UsageError naming a unit that does not exist."""
        ...

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        """The MIB / EAP-IG interchange record, or None where that format has no such circuits."""
        ...

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str: ...

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        """Circuit sizes of the faithfulness curve, and the MIB percentages they stand for (or None)."""
        ...

    def patcher(self, engine: PatchingEngine) -> Patcher: ...


def mib_curve_sizes(n_total: int) -> tuple[list[int], list[float]]:
    """The MIB curve: the top 0.1, 0.2, 0.5, ... 100 % of the units."""
    from circuitctl.metrics.faithfulness import MIB_PERCENTAGES, n_edges_for_percentage

    return [n_edges_for_percentage(p, n_total) for p in MIB_PERCENTAGES], list(MIB_PERCENTAGES)


def entry(score, in_graph) -> dict:
    """A node or unit entry of a circuit file: ``{"in_graph", "score"}`` (score None: not scored)."""
    return {"in_graph": bool(in_graph), "score": None if score is None else float(score)}


class OwnMask:
    """`mask` and `n_total` for a space whose units are a mask it owns (`self._mask`): nodes,
    neurons, per-position nodes, SAE features. Edge spaces take theirs from their graph."""

    _mask: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self._mask

    @property
    def n_total(self) -> int:
        return int(self._mask.numel())
