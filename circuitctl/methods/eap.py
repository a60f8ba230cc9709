"""Edge attribution patching (EAP; Syed et al. 2023).

score(u -> v) = sum over positions and d_model of (z_u(ablated) - z_u(clean)) * dm/d(input_v),
averaged over examples: one ablation forward plus one clean forward + backward per batch for
every edge at once. The per-layer contraction is one matrix product of the stacked output
differences [U, B*P*d] with the stacked input gradients [B*P*d, V_layer], in float32
whatever the model's dtype. Under torchrun each rank scores its share of the examples and
the score sums are all-reduced; a batch that runs out of accelerator memory is retried in halves.
"""

from __future__ import annotations

import torch

from circuitctl import distributed
from circuitctl.batching import BatchSizer
from circuitctl.config.methods import EapSettings
from circuitctl.errors import UsageError
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.progress import bar


def attribution_scores(context: DiscoveryContext, batch_size: int, gradient_runs) -> torch.Tensor:
    """Sum over batches of delta . gradient for every edge, times the metric's sign, per example.

    `gradient_runs(batch, ablation_outputs)` yields (weight, clean outputs, per-layer gradient
    iterator) for one batch: one triple for EAP, one per interpolation step for integrated
    gradients. The clean outputs come from the gradient pass itself, so no separate clean
    forward is run.
    """
    graph = context.graph
    engine = context.engine(batch_size)
    sizer = BatchSizer(batch_size, "attribution scoring")
    scores = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=context.adapter.device)

    local = distributed.shard(context.data)  # this rank's examples (all of them in one process)
    with bar(f"attribution ({context.metric.name})", -(-local.n // batch_size)) as advance:
        for block_scores in sizer.map(local, lambda batch: attribution_block(context, engine, gradient_runs, batch)):
            scores += block_scores
            advance()
    scores = distributed.all_reduce_sum(scores).cpu() * graph.edge_mask
    return context.metric.importance_sign * scores / context.data.n


def attribution_block(context: DiscoveryContext, engine, gradient_runs, batch) -> torch.Tensor:
    """One batch's sum over its gradient runs of weight x (ablation - clean) . gradient, as a
    fresh float32 [U, V] (a batch that runs out of memory leaves the running sums untouched)."""
    graph = context.graph
    batch = batch.to(context.adapter.device)
    ablation = engine.ablation_outputs(batch)
    block_scores = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=context.adapter.device)
    for weight, clean_outputs, per_layer in gradient_runs(batch, ablation):
        # one float32 buffer [U, B*P*d] (one pass for a float32 model)
        flat_delta = torch.sub(ablation.float(), clean_outputs.float()).flatten(1)
        for inputs, grads in per_layer:
            # the inputs of one layer read prefixes of nearly equal length: use the longest
            # and mask the few non-edges (a head's own layer) afterwards
            n_up = max(graph.prefix_len[v] for v in inputs)
            block = flat_delta[:n_up] @ grads.float().flatten(1).T  # [n_up, V_layer]
            block_scores[:n_up, inputs.start : inputs.stop] += weight * block
        del flat_delta
    return block_scores


def clean_gradient_run(context: DiscoveryContext):
    """EAP's single gradient pass at the clean input."""

    def runs(batch, ablation):
        def objective(logits):  # float32 metric, also for bfloat16 / float16 models
            logits = logits.float()
            return context.metric(logits, batch, logits.detach()).sum()

        _, outputs, per_layer = context.adapter.input_gradients(batch.clean, batch.answer_positions, objective)
        yield 1.0, outputs, per_layer

    return runs


def discover(context: DiscoveryContext, settings: EapSettings) -> DiscoveryResult:
    if context.metric.name == "kl":
        raise UsageError(
            "method 'eap' with metric 'kl': the gradient of the KL divergence is zero at the clean run, "
            "so every EAP score would be 0; use logit_diff or prob_diff"
        )
    scores = attribution_scores(context, settings.batch_size, clean_gradient_run(context))
    return DiscoveryResult(scores=scores, forward_passes=3.0)
