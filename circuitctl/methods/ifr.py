"""Information flow routes (Ferrando and Voita 2024), as the EAP-IG library and MIB compute it.

One clean forward pass; no counterfactual and no gradient. For a reader input x_v (the residual
stream a head's q, k or v projection reads, an MLP's input, the final residual stream that the
unembedding reads) and each writer u upstream of it, with c_u its output (a head's output without
b_O, the embedding, an MLP's output), at every token position:

    proximity(u, v) = max(0, ||x_v||_1 - ||x_v - c_u||_1),   importance = proximity / sum_u' proximity(u', v)

(0 where no writer is close). Importances are averaged over each prompt's real positions and
over the prompts. Attention across positions: as in the EAP-IG implementation, a writer is
compared with the reader's input *at the same position* only. An edge into a head's key or value
input measures how much of the key/value stream at each position the writer makes up, not
which query positions read it, and the attention pattern plays no part. Every q, k and v input of
the heads of one layer reads the same residual stream, so they get the same scores; an MLP reads
the stream after its layer's heads, the logits the final stream.

Scores are in [0, 1], larger = more of the reader's input (positive = important, as for every
method). Cost: one forward pass.
"""

from __future__ import annotations

import torch

from circuitctl.config.methods import IfrSettings
from circuitctl.methods.base import DiscoveryContext, DiscoveryResult
from circuitctl.progress import bar


def importance(writers: torch.Tensor, reader: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Sum over examples of the mean over real positions of each writer's normalised proximity.

    writers: [n, B, P, d] outputs; reader: [B, P, d] the input they add up to; real: bool [B, P].
    Returns [n] (float32)."""
    writers, reader = writers.float(), reader.float()
    reader_norm = reader.abs().sum(-1)  # [B, P]
    proximity = (reader_norm[None] - (reader[None] - writers).abs().sum(-1)).clamp(min=0)  # [n, B, P]
    total = proximity.sum(0, keepdim=True)
    share = torch.where(total > 0, proximity / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros((), device=total.device))
    share = share * real[None]
    return (share.sum(-1) / real.sum(-1).clamp(min=1)[None]).sum(-1)


def batch_scores(context: DiscoveryContext, batch) -> torch.Tensor:
    """Summed importances [U, V] of one batch's clean run."""
    adapter, graph = context.adapter, context.graph
    L = adapter.cfg.n_layers
    capture = adapter.run(batch.clean, batch.answer_positions)
    outputs, resid = capture.outputs, capture.resid
    real = batch.real_tokens
    scores = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=adapter.device)
    for layer in range(L):
        heads = graph.layer_inputs(layer)
        attention = [v for v in heads if v != graph.mlp_in_index[layer]]
        n_up = graph.head_out_start[layer]
        scores[:n_up, attention] = importance(outputs[:n_up], resid[layer], real)[:, None]
        v = graph.mlp_in_index[layer]
        if v is not None:
            n_up = graph.prefix_len[v]
            mlp_in = resid[layer] if graph.spec.parallel_attn_mlp else resid[layer + 1] - outputs[graph.mlp_out_index[layer]]
            scores[:n_up, v] = importance(outputs[:n_up], mlp_in, real)
    scores[:, graph.logits_index] = importance(outputs, resid[L], real)
    return scores


def discover(context: DiscoveryContext, settings: IfrSettings) -> DiscoveryResult:
    graph = context.graph
    total = torch.zeros(graph.n_upstream, graph.n_downstream, dtype=torch.float32, device=context.adapter.device)
    with torch.no_grad(), bar("information flow routes", -(-context.data.n // settings.batch_size)) as advance:
        for batch in context.data.batches(settings.batch_size):
            total += batch_scores(context, batch.to(context.adapter.device))
            advance()
    return DiscoveryResult(scores=(total.cpu() / context.data.n) * graph.edge_mask, forward_passes=1.0)
