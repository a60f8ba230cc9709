"""The input gradient of a TransformerLens normalisation for many cotangents at once.

Attribution needs, per layer, d(ln1(x) . c)/dx for one cotangent c per head and channel (about
3 x n_heads of them), all at the same x. The normalisation's backward is linear in c given the
forward statistics, so the statistics are computed once and every cotangent costs a few
element-wise passes: for LayerNorm with gain w, x_hat = (x - mean) / s, s = sqrt(var + eps),

    dx = (g - mean(g) - x_hat * mean(g * x_hat)) / s,      g = c * w

and for RMSNorm (x_hat = x / s, s = sqrt(mean(x^2) + eps)) the same without the mean(g) term.
This is the `vjp` of TransformerLens's own modules (float32 statistics for half-precision
models, as they compute them); other normalisations fall back to a vectorised `torch.func.vjp`.
"""

from __future__ import annotations

import torch


def normalisation_input_gradients(norm, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """d(norm(x) . c)/dx for each c in `cotangents` [n, *x.shape] -> [n, *x.shape] (x's dtype)."""
    from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre

    if not isinstance(norm, (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)):
        _, vjp_fn = torch.func.vjp(norm, x)
        return torch.vmap(vjp_fn)(cotangents)[0]
    centred = isinstance(norm, (LayerNorm, LayerNormPre))
    xf = x.float()
    if centred:
        xf = xf - xf.mean(-1, keepdim=True)
    inv_scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    x_hat = xf * inv_scale
    w = getattr(norm, "w", None)
    g = cotangents * w if w is not None else cotangents.clone()  # a fresh buffer, changed in place below
    g = g.float()
    projection = torch.einsum("...d,...d->...", g, x_hat.expand_as(g)).div_(g.shape[-1]).unsqueeze(-1)  # mean(g x_hat)
    if centred:
        g.sub_(g.mean(-1, keepdim=True))
    return g.addcmul_(x_hat, projection, value=-1).mul_(inv_scale).to(x.dtype)
