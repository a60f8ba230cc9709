"""A feature circuit: SAE-feature and error nodes, edges between them, in plain Python.

Moves between discovery (`circuitctl.methods.sfc`), evaluation (`circuitctl.sae.evaluate`) and
the files (`circuitctl.io.feature_circuit`). Node and edge names follow `circuitctl.graph.naming`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FeatureCircuit:
    sites: list[str]  # site names in forward order
    sae_sources: dict[str, Any]  # site -> its SAE directory, or {release, sae_id} of a sae-lens release
    aggregation: str  # "sum" (nodes summed over positions) | "none" (a node per position)
    positions: list[str] | None  # position labels by token index (aggregation "none")
    node_threshold: float
    edge_threshold: float
    nodes: dict[str, float]  # node -> score (every circuit node and the strongest others)
    circuit_nodes: list[str]
    edges: dict[str, float]  # "u->v" -> score, between circuit nodes and into "logits"
    circuit_edges: list[str]
    labels: dict[str, str] = field(default_factory=dict)  # feature node -> top-activating tokens
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return sum(1 for n in self.circuit_nodes if "/err" not in n)

    @property
    def n_errors(self) -> int:
        return sum(1 for n in self.circuit_nodes if "/err" in n)
