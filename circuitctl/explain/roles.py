"""Role scores of attention heads: pure functions on attention patterns and OV-circuit logits.

Every score is in [0, 1]; a role is listed on a node when its score reaches `THRESHOLDS[role]`
(the raw scores are always recorded).

Attention roles (measured on a token sequence, normally the repeated random probe of
`circuitctl.explain.probes`): for each query with at least one *target* key, the attention
mass the head puts on its targets; the score is the mean over those queries.

    previous_token   target i - 1 (queries whose previous token is not the prefix/BOS)
    duplicate_token  every earlier position holding the same token as the query
    induction        the position right after every earlier occurrence of the query's token
                     (from the second A to the token after the first A)

This differs from TransformerLens's `detect_head` ("mul" mode), which averages over every
query (so a perfect induction head scores about 0.5 on a sequence repeated once) and can drop
BOS attention from the denominator; here a perfect head scores 1 and attention to BOS counts
as attention elsewhere.

OV roles (from `circuitctl.explain.ov.ov_logits`: each probe token's embedding read through the
head's W_V W_O and the unembedding, restricted to the probe tokens as candidates):

    copy             fraction of probe tokens whose own logit is among the top-k candidates
    negative_copy    ... among the bottom-k candidates

Mover roles combine the task with the weights: attention from the answer position to the
head's strongest movable labelled position (clean prompts) times the copy (negative copy)
score: `mover` (`negative_mover`).
"""

from __future__ import annotations

import torch

ATTENTION_ROLES = ("previous_token", "duplicate_token", "induction")
OV_ROLES = ("copy", "negative_copy")
MOVER_ROLES = ("mover", "negative_mover")
ROLES = ATTENTION_ROLES + OV_ROLES + MOVER_ROLES

# A role is listed when its score reaches this value (see README, "Explaining a circuit").
THRESHOLDS: dict[str, float] = {role: 0.5 for role in ROLES}

# When a head has several listed roles, the most specific one names its group.
SPECIFICITY = ("mover", "negative_mover", "induction", "duplicate_token", "previous_token", "copy", "negative_copy")


# -- target masks ---------------------------------------------------------------------------
def previous_token_targets(tokens: torch.Tensor, first_query: int = 1) -> torch.Tensor:
    """Bool [N, P, P]: query i (i >= first_query) targets key i - 1."""
    n, p = tokens.shape
    mask = torch.zeros(n, p, p, dtype=torch.bool, device=tokens.device)
    rows = torch.arange(max(first_query, 1), p, device=tokens.device)
    mask[:, rows, rows - 1] = True
    return mask


def duplicate_token_targets(tokens: torch.Tensor, first_key: int = 0) -> torch.Tensor:
    """Bool [N, P, P]: query i targets every key j < i (j >= first_key) with tokens[j] == tokens[i]."""
    same = tokens[:, :, None] == tokens[:, None, :]
    p = tokens.shape[1]
    earlier = torch.ones(p, p, dtype=torch.bool, device=tokens.device).tril(-1)
    earlier[:, :first_key] = False
    return same & earlier


def induction_targets(tokens: torch.Tensor, first_key: int = 0) -> torch.Tensor:
    """Bool [N, P, P]: query i targets key j + 1 < i for every j >= first_key with tokens[j] == tokens[i]."""
    duplicates = duplicate_token_targets(tokens, first_key)  # [N, i, j]
    shifted = torch.zeros_like(duplicates)
    shifted[:, :, 1:] = duplicates[:, :, :-1]  # key j + 1 for every earlier occurrence j
    p = tokens.shape[1]
    before_query = torch.ones(p, p, dtype=torch.bool, device=tokens.device).tril(-1)
    return shifted & before_query


def attention_score(pattern: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over queries that have a target of the attention mass on their targets.

    pattern: [..., N, P, P] attention (rows sum to one); targets: bool [N, P, P].
    Returns [...] scores in [0, 1] (0 when no query has a target).
    """
    mass = (pattern * targets).sum(-1)  # [..., N, P]
    relevant = targets.any(-1)  # [N, P]
    count = relevant.sum()
    if int(count) == 0:
        return torch.zeros(pattern.shape[:-3], device=pattern.device)
    return (mass * relevant).sum((-2, -1)) / count


# -- OV roles -------------------------------------------------------------------------------
def copy_scores(logits: torch.Tensor, token_columns: torch.Tensor, k: int, rtol: float = 1e-5) -> tuple[float, float]:
    """(copy, negative_copy) of one head from its OV-circuit logits.

    logits: [n, C] logits over C candidate tokens for each of n probe tokens;
    token_columns: [n] the column of each probe token's own logit.
    Each candidate's mean over the probe tokens is subtracted first: a token-independent push
    (biases; the head raising some tokens whatever it reads) is not copying. Ties count against
    the token (a head writing nothing copies nothing), within `rtol` of the largest |logit|.
    """
    centred = logits - logits.mean(0, keepdim=True)
    tol = rtol * float(centred.abs().max()) + 1e-12
    own = centred.gather(1, token_columns[:, None])  # [n, 1]
    others = torch.ones_like(centred, dtype=torch.bool)
    others.scatter_(1, token_columns[:, None], False)
    at_least = ((centred >= own - tol) & others).sum(1)  # candidates not clearly below the token
    at_most = ((centred <= own + tol) & others).sum(1)
    return float((at_least < k).float().mean()), float((at_most < k).float().mean())


def copy_k(n_candidates: int) -> int:
    """k for top-k / bottom-k: 5% of the candidates, at least 1 (IOI paper: top 5)."""
    return max(1, n_candidates // 20)


def mover_scores(attention_to_target: float, copy: float, negative_copy: float) -> tuple[float, float]:
    """(mover, negative_mover): attention to the moved position times (negative) copying."""
    return attention_to_target * copy, attention_to_target * negative_copy


# -- listing --------------------------------------------------------------------------------
def listed_roles(scores: dict[str, float]) -> list[str]:
    """The roles whose score reaches its threshold, most specific first."""
    return [role for role in SPECIFICITY if scores.get(role, 0.0) >= THRESHOLDS[role]]
