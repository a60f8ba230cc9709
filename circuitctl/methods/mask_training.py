"""What the learned-mask methods (edge pruning, subnetwork probing) share: the examples of each
step in a reproducible order, the loss of a masked forward pass, the learning-rate schedule, and
optimizer state as plain tensors for checkpoints.

Every random choice is a function of (seed, step): the examples of step s come from the
permutation of epoch s // batches_per_epoch, seeded by (seed, epoch), and the mask noise of step
s from a generator seeded by (seed, s). A run resumed at step s therefore replays exactly the
steps an uninterrupted run would have taken (bit for bit on the CPU).
"""

from __future__ import annotations

import torch

from circuitctl.methods.base import DiscoveryContext
from circuitctl.methods.edge_pruning_forward import Workspace, masked_logits
from circuitctl.metrics.metrics import METRICS
from circuitctl.tasks.data import TaskData

_MIX = 1_000_003  # mixes (seed, counter) into one generator seed


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator of step `step`'s mask noise."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * _MIX + step + 1) % (2**63))
    return generator


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up from 0, then linear decay to 0 at `total` (the
    schedule of the edge-pruning reference, Hugging Face's get_linear_schedule_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class TrainingData:
    """The examples of each optimisation step, with their ablation outputs and the full model's
    logits (the reference of the KL objective). Both are computed once for every example when
    they fit in `cache_mib` (resample ablation), else recomputed at every step."""

    def __init__(self, context: DiscoveryContext, batch_size: int, cache_mib: float) -> None:
        self.context = context
        self.data = context.data
        self.batch_size = min(batch_size, self.data.n)
        self.engine = context.engine(self.batch_size)
        self.device = context.adapter.device
        self.workspace = Workspace()  # the masked passes' large buffers, reused from step to step
        self._ablation: torch.Tensor | None = None
        self._reference: torch.Tensor | None = None
        adapter, n = context.adapter, self.data.n
        per_example = adapter.d_vocab  # the full model's logits
        if context.ablation.type == "resample":  # and each example's own ablation outputs (zero / mean are shared)
            per_example += adapter.graph.n_upstream * self.data.clean.shape[1] * adapter.cfg.d_model
        if per_example * n * adapter.dtype.itemsize <= cache_mib * 2**20:
            self._fill_cache()

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.data.n // self.batch_size)

    def indices(self, step: int) -> torch.Tensor:
        """Example indices of step `step`: epoch-wise seeded permutations, consecutive batches
        (the last one of an epoch may be shorter)."""
        epoch, i = divmod(step, self.batches_per_epoch)
        generator = torch.Generator(device="cpu").manual_seed((self.context.seed * _MIX + epoch) % (2**63))
        order = torch.randperm(self.data.n, generator=generator, device="cpu")  # host: the same order on every device
        return order[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[TaskData, torch.Tensor, torch.Tensor]:
        """(examples, ablation outputs [U, B or 1, P, d], full-model logits [B, vocab]) of step `step`.
        Cached ablation outputs are copied into one buffer that the next call overwrites."""
        index = self.indices(step)
        batch = self.data.take(index).to(self.device)
        if self._reference is not None:
            index = index.to(self.device)
            if self._ablation is None:
                ablation = self.engine.ablation_outputs(batch)
            else:  # a reused buffer: a fresh one of this size (GPT-2: 60 MB at batch 8) is page faults every step
                ablation = self.workspace.take("ablation", (self._ablation.shape[0], len(index), *self._ablation.shape[2:]), self._ablation)
                torch.index_select(self._ablation, 1, index, out=ablation)
                self.workspace.give_back("ablation", ablation)
            return batch, ablation, self._reference[index]
        with torch.no_grad():
            reference = self.context.adapter.run(batch.clean, batch.answer_positions).logits
            ablation = self.engine.ablation_outputs(batch)
        return batch, ablation, reference

    def _fill_cache(self) -> None:
        references, ablations = [], []
        with torch.no_grad():
            for batch in self.data.batches(self.batch_size):
                batch = batch.to(self.device)
                references.append(self.context.adapter.run(batch.clean, batch.answer_positions).logits)
                if self.context.ablation.type == "resample":
                    ablations.append(self.engine.ablation_outputs(batch))
        self._reference = torch.cat(references)
        self._ablation = torch.cat(ablations, dim=1) if ablations else None


def objective_loss(context: DiscoveryContext, objective: str, batch: TaskData, ablation, reference, keep, workspace: Workspace | None = None) -> torch.Tensor:
    """The task part of the loss for a mask `keep` [U, V]: mean KL from the full model at the answer
    position, or the importance-signed metric change (positive when the masked model does worse)."""
    logits = masked_logits(context.adapter, batch.clean, batch.answer_positions, ablation, keep, workspace)
    if objective == "kl":
        return METRICS.get("kl")(logits, batch, reference).mean()
    metric = context.metric
    change = metric(logits, batch, reference) - metric(reference, batch, reference)
    return metric.importance_sign * change.mean()


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (Adam's step, moments) as named tensors."""
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value, device="cpu")
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str = "optimizer") -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == prefix:
            state.setdefault(int(parts[1]), {})[parts[2]] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
