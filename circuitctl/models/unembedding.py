"""The model's final normalisation and unembedding, with W_U's transpose copied once.

TransformerLens's `Unembed` computes ``F.linear(x, W_U.T.contiguous(), b_U)``: a copy of the
whole [d_model, vocab] matrix on every call (about 150 ms for GPT-2's 50k vocabulary on one CPU
thread, more than the rest of a small patched pass). `Unembedding` makes that copy once and
computes the same product, so logits are identical; `ModelAdapter.unembedding` keeps one per
model, renewed when W_U is replaced or edited in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPU_CHUNK = 2048  # vocabulary columns per block on the CPU: a block of logits stays in cache


class Unembedding:
    """The model's final normalisation and unembedding, with W_U's transpose made contiguous
    once (TransformerLens copies it on every call) so that any rows of it (vocabulary
    columns) are a cheap contiguous block."""

    def __init__(self, model) -> None:
        self.model = model
        self.source = model.unembed.W_U
        self.version = self.source._version  # an in-place edit of W_U makes this copy stale
        self.weight = self.source.T.contiguous()  # [V, d]
        self.bias = model.unembed.b_U
        self.vocab = self.weight.shape[0]
        on_cpu = self.weight.device.type == "cpu"
        self.chunk = CPU_CHUNK if on_cpu else self.vocab  # on an accelerator one call is fastest

    def fresh_for(self, model) -> bool:
        """Whether this copy still matches `model`'s W_U (same tensor, not edited in place)."""
        return model is self.model and model.unembed.W_U is self.source and self.source._version == self.version

    @classmethod
    def applies_to(cls, model) -> bool:
        """A copy of W_U serves only a frozen unembedding: with W_U trainable and gradients on,
        the copy would hold one step's graph, so TransformerLens's own unembedding runs."""
        return not (model.unembed.W_U.requires_grad and torch.is_grad_enabled())

    def normalize(self, final: torch.Tensor) -> torch.Tensor:
        """ln_final of final residuals [..., d] -> [M, d] (M = every leading index)."""
        x = final.reshape(-1, 1, final.shape[-1])
        if hasattr(self.model, "ln_final"):  # models without normalization have none
            x = self.model.ln_final(x)
        return x[:, 0]

    def columns(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits [M, len(ids)] of the vocabulary entries `ids` from normalised x [M, d]."""
        return F.linear(x, self.weight[ids], self.bias[ids])

    def blocks(self, x: torch.Tensor):
        """(start, logits [M, C]) for consecutive blocks of the vocabulary."""
        for lo in range(0, self.vocab, self.chunk):
            hi = min(lo + self.chunk, self.vocab)
            yield lo, F.linear(x, self.weight[lo:hi], self.bias[lo:hi])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
