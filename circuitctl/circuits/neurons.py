"""Neuron circuits: scores and membership [L, d_mlp] over MLP hidden units (``hook_post``), ``m{L}.n{i}``.

A neuron outside the circuit carries its ablation value (resample: its activation on the
corrupt prompt; zero; mean over the dataset's real tokens, per position or not); heads and
everything else stay as they are.
"""

from __future__ import annotations

import torch

from circuitctl import distributed
from circuitctl.circuits.space import OwnMask, entry, mib_curve_sizes
from circuitctl.errors import UsageError
from circuitctl.graph import naming
from circuitctl.graph.graph import Graph
from circuitctl.patching.engine import BatchState, PatchingEngine

ABLATION_KEY = "neuron_ablation"  # BatchState.extras: [L, B or 1, P, d_mlp]


class NeuronSpace(OwnMask):
    kind = "neuron"
    unit = "neurons"
    needs_node_ablation = False
    circuits_per_pass = 8

    def __init__(self, graph: Graph, d_mlp: int) -> None:
        if not graph.spec.has_mlps:
            raise UsageError("neuron circuits need a model with MLPs (this one is attention-only)")
        self.graph = graph
        self.d_mlp = d_mlp
        self._mask = torch.ones(graph.spec.n_layers, d_mlp, dtype=torch.bool, device="cpu")

    @classmethod
    def from_info(cls, info: dict, adapter, data) -> "NeuronSpace":
        if info.get("d_mlp") not in (None, adapter.cfg.d_mlp):
            raise UsageError(f"the circuit's MLPs have {info['d_mlp']} neurons, this model's {adapter.cfg.d_mlp}")
        return cls(adapter.graph, adapter.cfg.d_mlp)

    def info(self) -> dict:
        return {"kind": self.kind, "d_mlp": self.d_mlp}

    def unit_names(self) -> list[str]:
        return [naming.neuron(layer, i) for layer in range(self.graph.spec.n_layers) for i in range(self.d_mlp)]

    def prune(self, membership: torch.Tensor) -> torch.Tensor:
        return membership

    def nodes_in(self, membership: torch.Tensor) -> set[str]:
        return {naming.mlp(layer) for layer in membership.any(1).nonzero().flatten().tolist()}

    def entries(self, scores: torch.Tensor, membership: torch.Tensor) -> dict:
        mlps_in = self.nodes_in(membership)
        nodes = {name: entry(None, naming.parse_node(name).kind != "mlp" or name in mlps_in) for name in self.graph.nodes()}
        neurons = {
            naming.neuron(layer, i): entry(scores[layer, i], membership[layer, i])
            for layer in range(self.graph.spec.n_layers)
            for i in range(self.d_mlp)
        }
        return {"nodes": nodes, "edges": {}, "neurons": neurons}

    def read(self, record: dict, origin: str) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.zeros(self.graph.spec.n_layers, self.d_mlp, device="cpu")
        membership = torch.zeros_like(scores, dtype=torch.bool)
        for name, item in (record.get("neurons") or {}).items():
            try:
                layer, i = naming.parse_neuron(name)
            except ValueError as exc:
                raise UsageError(f"{origin}: {exc}") from exc
            if layer >= self.graph.spec.n_layers or i >= self.d_mlp:
                raise UsageError(f"{origin}: neuron '{name}' does not exist in this model")
            scores[layer, i] = float(item.get("score") or 0.0)
            membership[layer, i] = bool(item.get("in_graph", False))
        return scores, membership

    def mib(self, scores: torch.Tensor, membership: torch.Tensor, d_model: int) -> dict | None:
        return None

    def dot(self, scores: torch.Tensor, membership: torch.Tensor, title: str) -> str:
        from circuitctl.io.unit_drawing import neuron_dot

        return neuron_dot(scores, membership, title)

    def curve_sizes(self, scores: torch.Tensor) -> tuple[list[int], list[float] | None]:
        return mib_curve_sizes(self.n_total)

    def patcher(self, engine: PatchingEngine) -> "NeuronPatcher":
        return NeuronPatcher(engine, self)


class NeuronAblation:
    """What ablated neurons carry, per batch: the engine's ablation type applied to ``hook_post``."""

    def __init__(self, engine: PatchingEngine, d_mlp: int) -> None:
        self.engine, self.d_mlp = engine, d_mlp
        self._mean: torch.Tensor | None = None

    def values(self, batch) -> torch.Tensor:
        """[L, B or 1, P, d_mlp] ablation activations for `batch` (on the model's device)."""
        from circuitctl.models.gradients import neuron_activations

        engine = self.engine
        kind = engine.ablation.type
        if kind == "resample":
            return neuron_activations(engine.adapter, batch.corrupt)
        if kind == "zero":
            L, P = engine.adapter.cfg.n_layers, batch.clean.shape[1]
            return torch.zeros(L, 1, P, self.d_mlp, dtype=engine.adapter.dtype, device=engine.adapter.device)
        return self.mean()

    def pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean [L, B, P, n], ablation [L, B or 1, P, n]) activations for `batch`."""
        from circuitctl.models.gradients import neuron_activations

        return neuron_activations(self.engine.adapter, batch.clean), self.values(batch)

    def mean(self) -> torch.Tensor:
        """[L, 1, P, d_mlp] mean activations over the clean prompts' real tokens (float32 sums, all ranks)."""
        if self._mean is None:
            from circuitctl.models.gradients import neuron_activations

            engine = self.engine
            dims = (1,) if engine.ablation.per_position else (1, 2)
            total = count = 0.0
            for batch in distributed.shard(engine.data).batches(engine.batch_size):  # batches keep the full width P
                batch = batch.to(engine.adapter.device)
                post = neuron_activations(engine.adapter, batch.clean).float()
                real = batch.real_tokens.float()[None, :, :, None]
                total = total + (post * real).sum(dims, keepdim=True)
                count = count + real.sum(dims, keepdim=True)
            total, count = distributed.all_reduce_sum(total), distributed.all_reduce_sum(count)
            mean = (total / count.clamp(min=1)).to(engine.adapter.dtype)
            self._mean = mean.expand(-1, 1, engine.data.clean.shape[1], -1)
        return self._mean


class NeuronPatcher:
    """Neurons outside the circuit carry their ablation activations (`neuron_patched_logits`)."""

    def __init__(self, engine: PatchingEngine, space: NeuronSpace) -> None:
        self.engine = engine
        self.mask = space.mask.to(engine.adapter.device)
        self.ablation = NeuronAblation(engine, space.d_mlp)

    def prepare(self, state: BatchState) -> BatchState:
        if ABLATION_KEY not in state.extras:
            state.extras[ABLATION_KEY] = self.ablation.values(state.batch)  # kept with the (cached) batch
        return state

    def logits(self, state: BatchState, keep: torch.Tensor) -> torch.Tensor:
        from circuitctl.models.unit_patching import neuron_patched_logits

        ablated = self.mask & ~keep
        return neuron_patched_logits(
            self.engine.adapter, state.clean, state.extras[ABLATION_KEY], ablated, state.batch.answer_positions
        )
