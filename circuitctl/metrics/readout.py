"""A metric straight from final residual streams, computing only the logits it needs.

A search that evaluates thousands of patched runs (ACDC) ends each of them with the final
residual stream at the answer positions; turning that into logits over the whole vocabulary
(50257 x 768 multiply-adds per example for GPT-2) is most of a trial's cost. `MetricReadout`
computes the per-example metric of many such runs of one batch at once, and only what the
metric reads:

* logit difference: the logits of the batch's answer and wrong-answer tokens only (a few
  columns of the unembedding, with the ids renumbered to them: the same dot products);
* probability difference: those columns, plus the softmax normaliser (a log-sum-exp over
  the whole vocabulary, computed in vocabulary chunks that stay in the CPU's cache);
* KL divergence from the clean run: the whole vocabulary too (the normaliser again), in the
  same chunks, as ``log E_p[exp(d)] - E_p[d]`` with ``d = logits - clean logits`` and ``p``
  the clean distribution. Every term is of the size of ``d``, so this form loses nothing
  to cancellation, however large the logits themselves are;
* any other metric: the full logits, then the metric itself.

Equal to ``metric(unembed(ln_final(final)), batch, reference)`` up to float32 rounding
(tested). Logits are computed in the model's dtype, as the model computes them; the metric
in float32, as `circuitctl.metrics.metrics.Metric` does.
"""

from __future__ import annotations

import torch

from circuitctl.metrics import metrics as known
from circuitctl.metrics.metrics import Metric
from circuitctl.models.unembedding import Unembedding
from circuitctl.tasks.data import TaskData


def _remapped(batch: TaskData, columns: torch.Tensor) -> TaskData:
    """The batch with its answer and wrong-answer ids renumbered to positions in `columns`."""

    def remap(ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids >= 0, torch.searchsorted(columns, ids.clamp(min=0)), ids)

    return TaskData(batch.clean, batch.corrupt, batch.lengths, remap(batch.answers), remap(batch.wrong), batch.positions)


class MetricReadout:
    """Per-example metric [K, B] of K runs of one batch from their final residuals [K, B, d].

    `reference`: the clean logits [B, vocab] at the answer positions (the metric's reference,
    read by the KL divergence)."""

    def __init__(self, unembedding: Unembedding, metric: Metric, batch: TaskData, reference: torch.Tensor) -> None:
        self.unembedding = unembedding
        self.metric = metric
        self.batch = batch
        self.reference = reference.float()
        self._repeated: dict[int, TaskData] = {}
        self.kind = {known.logit_diff: "columns", known.prob_diff: "prob_diff", known.kl_divergence: "kl"}.get(metric.fn, "full")
        if self.kind in ("columns", "prob_diff"):
            ids = torch.cat([batch.answers.flatten(), batch.wrong.flatten()])
            self.columns = torch.unique(ids[ids >= 0])  # sorted
            self.narrow = _remapped(batch, self.columns)
        if self.kind == "kl":
            self.log_p = self.reference.log_softmax(-1)
            self.p = self.log_p.exp()

    def __call__(self, final: torch.Tensor) -> torch.Tensor:
        K, B = final.shape[0], final.shape[1]
        x = self.unembedding.normalize(final)
        if self.kind == "columns":
            narrow = self.unembedding.columns(x, self.columns).float()
            return self.metric(narrow, self._repeat(self.narrow, K)).view(K, B)
        if self.kind == "prob_diff":
            return self._prob_diff(x, K, B)
        if self.kind == "kl":
            return self._kl(x, K, B)
        logits = self.unembedding.logits(x).float()
        return self.metric(logits, self._repeat(self.batch, K), self.reference.repeat(K, 1)).view(K, B)

    def _repeat(self, batch: TaskData, K: int) -> TaskData:
        key = (id(batch), K)
        if key not in self._repeated:
            self._repeated[key] = batch.repeat(K)
        return self._repeated[key]

    def _kl(self, x: torch.Tensor, K: int, B: int) -> torch.Tensor:
        """KL(p || softmax(logits)) = log E_p[exp(d)] - E_p[d], d = logits - reference, by blocks."""
        mean_d = torch.zeros(K, B, dtype=torch.float32, device=x.device)
        partial = []  # per block: log sum_v p_v exp(d_v) over its columns
        for lo, block in self.unembedding.blocks(x):
            hi = lo + block.shape[1]
            d = block.float().view(K, B, -1).sub_(self.reference[:, lo:hi])
            mean_d += (d * self.p[:, lo:hi]).sum(-1)
            partial.append(torch.logsumexp(d.add_(self.log_p[:, lo:hi]), dim=-1))  # in place: the block stays in cache
        return torch.logsumexp(torch.stack(partial), dim=0) - mean_d

    def _prob_diff(self, x: torch.Tensor, K: int, B: int) -> torch.Tensor:
        """Answer minus wrong-answer probability: their logits, and the normaliser by blocks."""
        partial = [torch.logsumexp(block.float(), dim=-1) for _, block in self.unembedding.blocks(x)]
        normaliser = torch.logsumexp(torch.stack(partial), dim=0)  # [K * B]
        probs = (self.unembedding.columns(x, self.columns).float() - normaliser[:, None]).exp()
        batch = self._repeat(self.narrow, K)
        return (known._sum_gather(probs, batch.answers) - known._sum_gather(probs, batch.wrong)).view(K, B)
