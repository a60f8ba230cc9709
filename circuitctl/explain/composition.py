"""Composition scores between heads (Elhage et al. 2021), with their percentiles.

For an earlier head h1 and a later head h2, with W_OV = W_V W_O and W_QK = W_Q W_K^T in the
residual basis (row vectors, TransformerLens's convention):

    Q-composition  ||W_OV(h1) W_QK(h2)||_F   / (||W_OV(h1)||_F ||W_QK(h2)||_F)
    K-composition  ||W_OV(h1) W_QK(h2)^T||_F / (...)
    V-composition  ||W_OV(h1) W_OV(h2)||_F   / (||W_OV(h1)||_F ||W_OV(h2)||_F)

equal to TransformerLens's `all_composition_scores` (tested). The d_model x d_model products
are never formed: with L = X1 Y1 and R = X2 Y2 (X: [d, e], Y: [e, d]),
||L R||_F^2 = tr(M^T G1 M G2) with M = Y1 X2, G1 = X1^T X1, G2 = Y2 Y2^T.

A score's percentile is the share of the *other* head pairs at the same layer distance with a
clearly smaller score of the same kind (all pairs, or a seeded sample of `MAX_PAIRS`), so a
user sees whether the weights single out the edge a method found.
"""

from __future__ import annotations

import torch

KINDS = {"q": "Q", "k": "K", "v": "V"}
MAX_PAIRS = 256
_CHUNK = 256


def _factors(model, kind: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) [L, H, d, e] and [L, H, e, d] with X Y the head's matrix of `kind` ("OV", "Q", "K")."""
    get = lambda w: w.detach().to(dtype)  # noqa: E731
    if kind == "OV" or kind == "V":
        return get(model.W_V), get(model.W_O)
    if kind == "Q":  # W_QK = W_Q W_K^T
        return get(model.W_Q), get(model.W_K).transpose(-2, -1)
    if kind == "K":  # W_QK^T = W_K W_Q^T
        return get(model.W_K), get(model.W_Q).transpose(-2, -1)
    raise ValueError(f"unknown composition kind '{kind}'")


class CompositionScores:
    """Scores of any head pairs of one model, for the three kinds."""

    def __init__(self, model) -> None:
        self.model = model
        self.dtype = torch.float32
        self.n_layers, self.n_heads = model.cfg.n_layers, model.cfg.n_heads
        self._x1, self._y1 = _factors(model, "OV", self.dtype)
        self._g1 = self._x1.transpose(-2, -1) @ self._x1  # [L, H, e, e]
        self._ov_norm = self._frobenius(self._x1, self._y1)
        self._right = {}
        for kind in ("Q", "K", "V"):
            x2, y2 = _factors(model, kind, self.dtype)
            self._right[kind] = (x2, y2 @ y2.transpose(-2, -1), self._frobenius(x2, y2))

    @staticmethod
    def _frobenius(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """||X Y||_F per head, from the e x e Gram matrices."""
        gx = x.transpose(-2, -1) @ x
        gy = y @ y.transpose(-2, -1)
        return (gx * gy).sum((-2, -1)).clamp(min=0).sqrt()

    def scores(self, kind: str, pairs: torch.Tensor) -> torch.Tensor:
        """pairs [n, 4] of (layer1, head1, layer2, head2) -> [n] float scores."""
        x2, g2, norm2 = self._right[kind]
        out = []
        for chunk in pairs.to(x2.device).split(_CHUNK):
            l1, h1, l2, h2 = (chunk[:, i] for i in range(4))
            m = self._y1[l1, h1] @ x2[l2, h2]  # [n, e, e]
            value = ((self._g1[l1, h1] @ m) * (m @ g2[l2, h2])).sum((-2, -1)).clamp(min=0).sqrt()
            denominator = self._ov_norm[l1, h1] * norm2[l2, h2]
            out.append(torch.where(denominator > 0, value / denominator.clamp(min=1e-30), torch.zeros_like(value)))
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

    def pairs_at_distance(self, distance: int, seed: int) -> torch.Tensor:
        """[n, 4] every head pair `distance` layers apart (a seeded sample if there are more than MAX_PAIRS)."""
        L, H = self.n_layers, self.n_heads
        n = (L - distance) * H * H
        if n <= 0:
            return torch.zeros(0, 4, dtype=torch.long)
        flat = torch.arange(n)
        if n > MAX_PAIRS:
            flat = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:MAX_PAIRS]
        l1, rest = flat // (H * H), flat % (H * H)
        return torch.stack([l1, rest // H, l1 + distance, rest % H], dim=1)


def percentile(value: float, others: torch.Tensor, rtol: float = 1e-4) -> float:
    """Percent of `others` clearly below `value`."""
    if others.numel() == 0:
        return 100.0
    below = others < value - rtol * max(abs(value), 1e-12)
    return 100.0 * float(below.float().mean())


def composition_table(model, head_edges: list[tuple[str, tuple[int, int], tuple[int, int], str, float | None]], seed: int) -> list[dict]:
    """One row per (edge, kind): head_edges are (edge name, (l1, h1), (l2, h2), channel or None
    for all three kinds, edge score)."""
    if not head_edges:
        return []
    scorer = CompositionScores(model)
    distributions: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for name, (l1, h1), (l2, h2), channel, edge_score in head_edges:
        kinds = [KINDS[channel]] if channel else ["Q", "K", "V"]
        for kind in kinds:
            distance = l2 - l1
            if (kind, distance) not in distributions:
                pairs = scorer.pairs_at_distance(distance, seed)
                distributions[(kind, distance)] = (pairs, scorer.scores(kind, pairs))
            pairs, scores = distributions[(kind, distance)]
            score = float(scorer.scores(kind, torch.tensor([[l1, h1, l2, h2]]))[0])
            itself = (pairs == torch.tensor([l1, h1, l2, h2])).all(1)
            rows.append(
                {
                    "edge": name,
                    "kind": kind,
                    "score": score,
                    "percentile": percentile(score, scores[~itself]),
                    "layer_distance": distance,
                    "pairs_compared": int((~itself).sum()),
                    "edge_score": edge_score,
                }
            )
    return rows
