"""Edge pruning (Bhaskar et al. 2024): learn which edges a circuit needs by optimisation.

Every edge u -> v of the graph (q, k and v inputs of a head separately) gets a log-alpha, the
parameter of a hard-concrete mask z (`circuitctl.methods.hard_concrete`). At each step a mask is
sampled and the model runs with each reader's input = z * (writer's output in this pass) +
(1 - z) * (writer's ablated output) (`edge_pruning_forward.masked_logits`: one mixing product per
layer). The loss is

    KL(full model || masked model) at the answer position + lambda1 (s - t) + lambda2 (s - t)^2,

with s the expected edge sparsity, 1 - mean over the edges of P(z > 0) (``sparsity_measure:
expected``, smooth, with a gradient for every edge; ``sampled`` uses the sampled masks instead, as
the reference does) and t the target sparsity, warmed up linearly from 0 over
`sparsity_warmup_steps`. The log-alphas are
minimised and the multipliers lambda1, lambda2 (starting at 0) maximised, both with AdamW
(learning rate 0.8, torch's default weight decay 0.01, as the reference) under a linear warm-up
and decay of the learning rate. Defaults are the reference's GPT-2 IOI settings: 3000 steps,
2500 warm-up steps, batch 32, log-alphas initialised at 10 (+- 0.01, every mask open).

At the end the mask is binarised as the reference does: the round(sum of P(z > 0)) edges with the
largest log-alphas form the native circuit. Edge scores, for selection and the MIB curves, are
the log-alphas shifted so that the lowest is 0 (auto-circuit's convention), so any `selection:`
ranks edges by their learned log-alpha. A list of targets is a sweep: each target is trained
from the same initialisation and seed, one circuit per target (``sparsity-0.95/``). The
reference also learns node (writer) masks; this implementation learns edge masks only.

`init_from` starts from another method's scores (the best 2025 MIB entry initialised edge
pruning from EAP-IG): the rank of |score| sets the initial log-alphas (`hard_concrete.warm_start`)
and the target warm-up starts at `init_sparsity`.

Resumable: the checkpoint holds the log-alphas, multipliers, AdamW state, the step, the finished
targets' log-alphas and the training log; data order and noise are functions of (seed, step),
so a resumed run ends with the same masks as an uninterrupted one (bit for bit on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitctl import distributed
from circuitctl.checkpoint import Autosave, hold_interrupts
from circuitctl.config.methods import EdgePruningSettings
from circuitctl.errors import UsageError
from circuitctl.methods import hard_concrete
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult, SweepPoint
from circuitctl.methods.ensemble import member_edge_scores
from circuitctl.methods.mask_training import (
    TrainingData,
    linear_schedule,
    load_optimizer_tensors,
    objective_loss,
    optimizer_tensors,
    step_generator,
)
from circuitctl.progress import bar

METHOD = "edge_pruning"


@dataclass
class _Progress:
    """Where the sweep is: finished targets, and the current target's step. Replaced (or changed
    inside `hold_interrupts`) so that a Ctrl-C at any moment finds a consistent one."""

    point: int = 0
    step: int = 0
    finished: list[torch.Tensor] = field(default_factory=list)  # log-alphas of the finished targets
    log: list[list[dict]] = field(default_factory=list)  # per target: training log rows


class _Pruner:
    """One target's optimisation: log-alphas, multipliers and their AdamW."""

    def __init__(self, context: DiscoveryContext, settings: EdgePruningSettings, initial: torch.Tensor) -> None:
        self.settings = settings
        device = context.adapter.device
        self.log_alpha = initial.clone().to(device).requires_grad_(True)
        self.lambdas = torch.zeros(2, device=device, requires_grad=True)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [self.log_alpha], "lr": settings.lr},
                {"params": [self.lambdas], "lr": settings.lambda_lr, "maximize": True},
            ],
            weight_decay=settings.weight_decay,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"log_alpha": self.log_alpha.detach(), "lambdas": self.lambdas.detach(), **optimizer_tensors(self.optimizer)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
            self.lambdas.copy_(tensors["lambdas"])
        load_optimizer_tensors(self.optimizer, tensors)


def discover(context: DiscoveryContext, settings: EdgePruningSettings) -> DiscoveryResult:
    if distributed.world_size() > 1:
        raise UsageError("method 'edge_pruning' runs on one process; run it without torchrun")
    graph = context.graph
    edge_mask = graph.edge_mask.to(context.adapter.device)
    targets = settings.targets()
    sparsities = [_sparsity(kind, value, graph.n_edges) for kind, value in targets]
    progress = _Progress(log=[[] for _ in targets])
    init_scores: torch.Tensor | None = None
    init_passes = 0.0  # the forward passes of the method that gave init_scores
    pruner: _Pruner | None = None

    def snapshot() -> tuple[dict, dict]:
        tensors = {f"finished.{i}": t for i, t in enumerate(progress.finished)}
        if init_scores is not None:
            tensors["init_scores"] = init_scores
        if pruner is not None:
            tensors.update(pruner.tensors())
        state = {"point": progress.point, "step": progress.step, "n_edges": graph.n_edges, "log": progress.log, "init_forward_passes": init_passes}
        return state, tensors

    autosave = Autosave(context.checkpoint, METHOD, settings.checkpoint_every_seconds, snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        progress, init_scores, init_passes = _restored(loaded, graph, len(targets), context)
    if settings.init_from is not None and init_scores is None:
        init_scores, init_passes = member_edge_scores(context, settings.init_from)
        autosave.save()
    start_sparsity = settings.init_sparsity if init_scores is not None else 0.0
    data = TrainingData(context, settings.batch_size, settings.cache_mib)
    try:
        with bar(f"edge pruning ({len(targets)} target{'s' if len(targets) > 1 else ''})", len(targets) * settings.steps) as advance:
            advance(progress.point * settings.steps + progress.step)
            while progress.point < len(targets):
                pruner = _Pruner(context, settings, _initial_log_alpha(context, settings, init_scores, edge_mask))
                if loaded is not None and progress.step > 0:
                    pruner.load(loaded[1])
                loaded = None
                for step in range(progress.step, settings.steps):
                    row = _step(context, settings, data, pruner, step, sparsities[progress.point], start_sparsity, edge_mask)
                    with hold_interrupts():
                        pruner.optimizer.step()
                        progress.step = step + 1
                        if step % max(1, settings.steps // 100) == 0 or step + 1 == settings.steps:
                            progress.log[progress.point].append(row)
                    advance()
                    autosave.maybe_save()
                with hold_interrupts():
                    progress.finished.append(pruner.log_alpha.detach().clone())
                    progress.point, progress.step, pruner = progress.point + 1, 0, None
                autosave.maybe_save()
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise autosave.interrupted("edge pruning") from None
    return _result(context, settings, targets, sparsities, progress, data, init_passes)


def _sparsity(kind: str, value, n_edges: int) -> float:
    return float(value) if kind == "sparsity" else 1.0 - min(value, n_edges) / n_edges


def _step(context, settings, data: TrainingData, pruner: _Pruner, step: int, target: float, start: float, edge_mask) -> dict:
    """Forward and backward of one step (the optimizer step is the caller's); the log row."""
    factor = linear_schedule(step, settings.lr_warmup_steps, settings.steps)
    pruner.optimizer.param_groups[0]["lr"] = settings.lr * factor
    pruner.optimizer.param_groups[1]["lr"] = settings.lambda_lr * factor
    if step < settings.sparsity_warmup_steps:
        t = start + (target - start) * step / settings.sparsity_warmup_steps
    else:
        t = target
    batch, ablation, reference = data.batch(step)
    pruner.optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        z = hard_concrete.sample(pruner.log_alpha, step_generator(context.seed, step, pruner.log_alpha.device))
        task_loss = objective_loss(context, settings.objective, batch, ablation, reference, z, data.workspace)
        if settings.sparsity_measure == "sampled":
            s = 1 - (z * edge_mask).sum() / edge_mask.sum()
        else:
            s = 1 - (hard_concrete.prob_nonzero(pruner.log_alpha) * edge_mask).sum() / edge_mask.sum()
        lambda1, lambda2 = pruner.lambdas[0], pruner.lambdas[1]
        loss = task_loss + lambda1 * (s - t) + lambda2 * (s - t) ** 2
        loss.backward()
    return {
        "step": step,
        settings.objective: float(task_loss.detach()),
        "sparsity": float(s.detach()),
        "target": t,
        "lambda1": float(lambda1.detach()),
        "lambda2": float(lambda2.detach()),
    }


def _initial_log_alpha(context, settings: EdgePruningSettings, init_scores, edge_mask) -> torch.Tensor:
    """N(init_log_alpha, 0.01) per edge (the reference's), or the warm start from another method."""
    graph = context.graph
    # drawn on the host, so that a seed gives the same initial masks on every device
    generator = torch.Generator(device="cpu").manual_seed(context.seed)
    noise = torch.randn(graph.n_upstream, graph.n_downstream, generator=generator, device="cpu")
    initial = settings.init_log_alpha + 0.01 * noise
    if init_scores is not None:
        mask = graph.edge_mask
        initial[mask] = hard_concrete.warm_start(init_scores[mask].float(), 1.0 - settings.init_sparsity)
    return initial.to(edge_mask.device)


def _result(context, settings, targets, sparsities, progress: _Progress, data: TrainingData, init_passes: float) -> DiscoveryResult:
    graph = context.graph
    mask = graph.edge_mask
    training = _forward_passes(settings, data)  # per target; the warm start ran once for all
    points = []
    for (kind, value), target, log_alpha, log in zip(targets, sparsities, progress.finished, progress.log):
        log_alpha = log_alpha.float().cpu()
        membership = hard_concrete.binarize(log_alpha, mask)
        scores = torch.where(mask, log_alpha - log_alpha[mask].min(), torch.zeros((), device="cpu"))
        extra = {
            "edge_pruning": {
                kind: value,
                "target_sparsity": target,
                "expected_edges": float(hard_concrete.prob_nonzero(log_alpha)[mask].sum()),
                "binarized_edges": int(membership.sum()),
                "final": log[-1] if log else None,
            }
        }
        label = f"{kind}-{value:g}" if isinstance(value, float) else f"{kind}-{value}"
        points.append(SweepPoint(label, {kind: value}, scores, membership, init_passes + training, extra))
    files = {"edge_pruning_log.json": {"points": [{"label": p.label, "log": log} for p, log in zip(points, progress.log)]}}
    if len(points) == 1:
        only = points[0]
        return DiscoveryResult(only.scores, only.membership, forward_passes=only.forward_passes, extra=only.extra, files=files)
    total = init_passes + training * len(points)
    return DiscoveryResult(points[0].scores, points[0].membership, forward_passes=total, files=files, sweep=points)


def _forward_passes(settings: EdgePruningSettings, data: TrainingData) -> float:
    """Forward-pass equivalents over the dataset of one target's training: the clean and ablation
    runs, then one masked forward (and backward) per step on `batch_size` examples (an `init_from`
    method's passes are added by the caller)."""
    return 2.0 + settings.steps * data.batch_size / data.data.n


def _restored(loaded, graph, n_targets: int, context) -> tuple[_Progress, torch.Tensor | None, float]:
    """(progress, the init_from scores, their method's forward passes) of a checkpoint."""
    state, tensors = loaded
    if state.get("n_edges") != graph.n_edges or len(state.get("log", [])) != n_targets:
        raise UsageError(f"{context.checkpoint.dir}: the checkpoint does not fit this model and config; delete it to start over")
    finished = [tensors[f"finished.{i}"] for i in range(state["point"])]
    progress = _Progress(state["point"], state["step"], finished, state["log"])
    return progress, tensors.get("init_scores"), float(state.get("init_forward_passes", 0.0))
