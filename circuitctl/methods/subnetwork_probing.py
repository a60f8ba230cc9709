"""Subnetwork probing (the SP baseline of the ACDC paper, after Cao et al. 2021): a hard-concrete
mask per node, learned on the task loss plus an L0 penalty.

Node masks use the edge-pruning machinery: a node u with mask z_u feeds every reader
z_u * (its output in this pass) + (1 - z_u) * (its ablated output), i.e. the edge mask
``keep[u, v] = z_u`` (`edge_pruning_forward.node_keep`). The loss is

    KL(full model || masked model) at the answer position + lambda_reg * mean_u P(z_u > 0)

(the ACDC code's regulariser, the expected fraction of nodes kept), minimised with Adam. The
native circuit keeps the nodes whose noiseless mask exceeds 1/2 (log-alpha > 0); scores are the
log-alphas shifted so that the lowest is 0. Differences from the ACDC code: the masks sit on node
outputs (input, heads, MLPs) rather than on each head's q/k/v activations and MLP outputs, so the
circuit is a node circuit (`NodeSpace`), selected, evaluated and written like EAP-IG's node circuits.

Resumable exactly like edge pruning (log-alphas, Adam state, step; data order and noise are
functions of (seed, step)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuitctl import distributed
from circuitctl.checkpoint import Autosave, hold_interrupts
from circuitctl.circuits.nodes import NodeSpace
from circuitctl.config.methods import SubnetworkProbingSettings
from circuitctl.errors import UsageError
from circuitctl.methods import hard_concrete
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.methods.edge_pruning_forward import node_keep
from circuitctl.methods.mask_training import (
    TrainingData,
    load_optimizer_tensors,
    objective_loss,
    optimizer_tensors,
    step_generator,
)
from circuitctl.progress import bar

METHOD = "subnetwork_probing"


@dataclass
class _Progress:
    step: int = 0
    log: list | None = None


def discover(context: DiscoveryContext, settings: SubnetworkProbingSettings) -> DiscoveryResult:
    if distributed.world_size() > 1:
        raise UsageError("method 'subnetwork_probing' runs on one process; run it without torchrun")
    graph, device = context.graph, context.adapter.device
    generator = torch.Generator(device="cpu").manual_seed(context.seed)  # host: the same masks on every device
    initial = settings.init_log_alpha + 0.01 * torch.randn(graph.n_upstream, generator=generator, device="cpu")
    log_alpha = initial.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([log_alpha], lr=settings.lr)
    progress = _Progress(0, [])

    def snapshot() -> tuple[dict, dict]:
        state = {"step": progress.step, "n_nodes": graph.n_upstream, "log": progress.log}
        return state, {"log_alpha": log_alpha.detach(), **optimizer_tensors(optimizer)}

    autosave = Autosave(context.checkpoint, METHOD, settings.checkpoint_every_seconds, snapshot)
    loaded = autosave.load(context.resume)
    if loaded is not None:
        state, tensors = loaded
        if state.get("n_nodes") != graph.n_upstream:
            raise UsageError(f"{context.checkpoint.dir}: the checkpoint does not fit this model; delete it to start over")
        with torch.no_grad():
            log_alpha.copy_(tensors["log_alpha"])
        load_optimizer_tensors(optimizer, tensors)
        progress = _Progress(state["step"], state["log"])
    data = TrainingData(context, settings.batch_size, settings.cache_mib)
    try:
        with bar("subnetwork probing", settings.steps) as advance:
            advance(progress.step)
            for step in range(progress.step, settings.steps):
                batch, ablation, reference = data.batch(step)
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    z = hard_concrete.sample(log_alpha, step_generator(context.seed, step, device))
                    task_loss = objective_loss(context, settings.objective, batch, ablation, reference, node_keep(graph, z), data.workspace)
                    penalty = hard_concrete.prob_nonzero(log_alpha).mean()
                    (task_loss + settings.lambda_reg * penalty).backward()
                with hold_interrupts():
                    optimizer.step()
                    progress.step = step + 1
                    if step % max(1, settings.steps // 100) == 0 or step + 1 == settings.steps:
                        progress.log.append({"step": step, settings.objective: float(task_loss.detach()), "expected_nodes": float(penalty.detach()) * graph.n_upstream})
                advance()
                autosave.maybe_save()
    except KeyboardInterrupt:
        if context.checkpoint is None:
            raise
        raise autosave.interrupted("subnetwork probing") from None
    final = log_alpha.detach().float().cpu()
    membership = final > 0
    extra = {
        "subnetwork_probing": {"native_nodes": [graph.upstream[u] for u in membership.nonzero().flatten().tolist()], "final": progress.log[-1]},
    }
    forward_passes = 2.0 + settings.steps * data.batch_size / context.data.n
    files = {"subnetwork_probing_log.json": {"log": progress.log}}
    return DiscoveryResult(
        scores=final - final.min(), membership=membership, space=NodeSpace(graph), forward_passes=forward_passes, extra=extra, files=files
    )
