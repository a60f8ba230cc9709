"""A head's OV circuit read through the unembedding, for the copy roles.

For each probe token t the head is given t's embedding as its source (through the first MLP
for heads after layer 0 of models with MLPs, as in the IOI paper: in GPT-2-like models MLP0
acts as part of the embedding), normalised by the head's own input LayerNorm, moved by
W_V W_O and read by the final normalisation and the unembedding. Only the probe tokens are
kept as candidate outputs (so the columns are the same tokens as the rows).
"""

from __future__ import annotations

import torch


def effective_embedding(model, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """[n, d_model] the residual-stream vector a head of `layer` sees for each token."""
    x = model.W_E[tokens]
    if layer > 0 and not model.cfg.attn_only:
        block = model.blocks[0]
        norm = block.ln2 if hasattr(block, "ln2") else block.ln1  # parallel attention/MLP blocks read ln1
        x = x + block.mlp(norm(x[:, None]))[:, 0]
    return x


def ov_logits(model, layer: int, head: int, tokens: torch.Tensor) -> torch.Tensor:
    """[n, n] logits of the probe tokens (columns) for each probe token (rows) as the source."""
    with torch.no_grad():
        tokens = tokens.to(model.W_U.device)
        block = model.blocks[layer]
        x = block.ln1(effective_embedding(model, tokens, layer)[:, None])[:, 0]
        attn = block.attn
        out = (x @ attn.W_V[head] + attn.b_V[head]) @ attn.W_O[head]
        if getattr(model, "ln_final", None) is not None:
            out = model.ln_final(out[:, None])[:, 0]
        return (out @ model.W_U[:, tokens]).float()
