"""A head's OV circuit read through the unembedding, for the copy roles.

For each probe token t the head is given t's embedding as its source (through the first MLP
for heads after layer 0 of models with MLPs, as in the IOI paper: in GPT-2-like models MLP0
acts as part of the embedding), normalised by the head's own input LayerNorm, moved by
W_V W_O and read by the final normalisation and the unembedding. Only the probe tokens are
kept as candidate outputs (so the columns are the same tokens as the rows).
"""

from __future__ import annotations

import torch


class OvProbe:
    """OV-circuit logits of any head over one set of probe tokens (embeddings, the first MLP and
    each layer's input normalisation computed once)."""

    def __init__(self, model, tokens: torch.Tensor) -> None:
        self.model = model
        self.tokens = tokens.to(model.W_U.device)
        with torch.no_grad():
            x = model.W_E[self.tokens]
            self._embedding = {0: x}
            if not model.cfg.attn_only:  # heads after layer 0 see the token through MLP0 too
                block = model.blocks[0]
                norm = block.ln2 if hasattr(block, "ln2") else block.ln1  # parallel attention/MLP blocks read ln1
                self._embedding[1] = x + block.mlp(norm(x[:, None]))[:, 0]
        self._normalised: dict[int, torch.Tensor] = {}

    def _source(self, layer: int) -> torch.Tensor:
        if layer not in self._normalised:
            x = self._embedding[1 if layer > 0 and 1 in self._embedding else 0]
            self._normalised[layer] = self.model.blocks[layer].ln1(x[:, None])[:, 0]
        return self._normalised[layer]

    def logits(self, layer: int, head: int) -> torch.Tensor:
        """[n, n] logits of the probe tokens (columns) for each probe token (rows) as the source."""
        model = self.model
        with torch.no_grad():
            attn = model.blocks[layer].attn
            out = (self._source(layer) @ attn.W_V[head] + attn.b_V[head]) @ attn.W_O[head]
            if getattr(model, "ln_final", None) is not None:
                out = model.ln_final(out[:, None])[:, 0]
            return (out @ model.W_U[:, self.tokens]).float().cpu()


def ov_logits(model, layer: int, head: int, tokens: torch.Tensor) -> torch.Tensor:
    """[n, n] OV-circuit logits of one head (see `OvProbe`)."""
    return OvProbe(model, tokens).logits(layer, head)
