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


def attribution_scores(context: DiscoveryContext, batch_size: int, gradient_runs, per_example: bool = False) -> torch.Tensor:
    """Sum over batches of delta . gradient for every edge, times the metric's sign, per example.

    `gradient_runs(batch, ablation_outputs)` yields (weight, clean outputs, per-layer gradient
    iterator) for one batch: one triple for EAP, one per interpolation step for integrated
    gradients. The clean outputs come from the gradient pass itself, so no separate clean
    forward is run.

    per_example: instead of the mean [U, V], every example's contribution [N, U, V] (the same
    sign and edge mask; the scores of a set of examples are the mean of its rows).
    """
    graph = context.graph
    engine = context.engine(batch_size)
    sizer = BatchSizer(batch_size, "attribution scoring")
    local = distributed.shard(context.data)  # this rank's examples (all of them in one process)
    rows = (local.n,) if per_example else ()
    scores = torch.zeros(*rows, graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=context.adapter.device)
    done = 0
    with bar(f"attribution ({context.metric.name})", -(-local.n // batch_size)) as advance:
        for block_scores in sizer.map(local, lambda batch: attribution_block(context, engine, gradient_runs, batch, per_example)):
            if per_example:
                scores[done : done + block_scores.shape[0]] = block_scores
                done += block_scores.shape[0]
            else:
                scores += block_scores
            advance()
    if per_example:
        return context.metric.importance_sign * distributed.gather_rows(scores, context.data.n).cpu() * graph.edge_mask
    scores = distributed.all_reduce_sum(scores).cpu() * graph.edge_mask
    return context.metric.importance_sign * scores / context.data.n


def attribution_block(context: DiscoveryContext, engine, gradient_runs, batch, per_example: bool = False) -> torch.Tensor:
    """One batch's sum over its gradient runs of weight x (ablation - clean) . gradient, as a
    fresh float32 [U, V] (a batch that runs out of memory leaves the running sums untouched);
    per_example: each example's [B, U, V] instead of their sum."""
    graph = context.graph
    batch = batch.to(context.adapter.device)
    ablation = engine.ablation_outputs(batch)
    rows = (batch.n,) if per_example else ()
    block_scores = torch.zeros(*rows, graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=context.adapter.device)
    for weight, clean_outputs, per_layer in gradient_runs(batch, ablation):
        # one float32 buffer [U, B, P, d] (one pass for a float32 model)
        delta = torch.sub(ablation.float(), clean_outputs.float())
        flat_delta = delta.flatten(2).transpose(0, 1) if per_example else delta.flatten(1)  # [B, U, P*d] or [U, B*P*d]
        for inputs, grads in per_layer:
            # the inputs of one layer read prefixes of nearly equal length: use the longest
            # and mask the few non-edges (a head's own layer) afterwards
            n_up = max(graph.prefix_len[v] for v in inputs)
            if per_example:  # [B, n_up, P*d] @ [B, P*d, V_layer]
                block = torch.bmm(flat_delta[:, :n_up], grads.float().flatten(2).permute(1, 2, 0))
                block_scores[:, :n_up, inputs.start : inputs.stop] += weight * block
                continue
            block = flat_delta[:n_up] @ grads.float().flatten(1).T  # [n_up, V_layer]
            block_scores[:n_up, inputs.start : inputs.stop] += weight * block
        del flat_delta, delta
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
    if context.per_example:
        contributions = attribution_scores(context, settings.batch_size, clean_gradient_run(context), per_example=True)
        return DiscoveryResult(scores=contributions.sum(0) / context.data.n, forward_passes=3.0, per_example=contributions)
    scores = attribution_scores(context, settings.batch_size, clean_gradient_run(context))
    return DiscoveryResult(scores=scores, forward_passes=3.0)
