"""The token sets the role scores are measured on.

* Repeated random tokens: ``[prefix] x_1 .. x_k x_1 .. x_k`` with k distinct tokens drawn per
  row, as long as the model's context allows (k <= 20). The prefix is the BOS token when the
  model prepends one, else the first token of every task prompt when they all share it (the
  planted tasks' BOS), else nothing. Special tokens and the prefix are never drawn.
* OV probe tokens: the task's answer and wrong-answer tokens when there are at least
  `MIN_ANSWER_TOKENS` distinct ones (e.g. the names of IOI), else a sample of the vocabulary
  (all of it up to `MAX_VOCAB_SAMPLE` tokens).

Both work on token ids alone: no tokenizer is needed (planted models have none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ANSWER_TOKENS = 8
MAX_VOCAB_SAMPLE = 512
MAX_HALF_LENGTH = 20
N_SEQUENCES = 32


@dataclass(frozen=True)
class RepeatedProbe:
    tokens: torch.Tensor  # [n, P]
    prefix: int | None  # the token at position 0, or None
    half_length: int  # k: every token after the prefix occurs twice, k positions apart

    @property
    def first_content(self) -> int:
        """Index of x_1 (the first drawn token)."""
        return 0 if self.prefix is None else 1

    def describe(self) -> dict:
        return {"sequences": int(self.tokens.shape[0]), "half_length": self.half_length, "prefix_token": self.prefix}


def special_token_ids(tokenizer) -> set[int]:
    if tokenizer is None:
        return set()
    return {int(t) for t in getattr(tokenizer, "all_special_ids", []) or []}


def prefix_token(bos: int | None, clean: torch.Tensor, lengths: torch.Tensor) -> int | None:
    """The model's BOS token, else the first token shared by every prompt, else None."""
    if bos is not None:
        return int(bos)
    first = clean[:, 0]
    if bool((lengths > 1).all()) and bool((first == first[0]).all()):
        return int(first[0])
    return None


def allowed_tokens(d_vocab: int, excluded: set[int]) -> torch.Tensor:
    keep = torch.ones(d_vocab, dtype=torch.bool)
    for t in excluded:
        if 0 <= t < d_vocab:
            keep[t] = False
    return keep.nonzero().flatten()


def repeated_random(d_vocab: int, n_ctx: int, prefix: int | None, excluded: set[int], seed: int, n: int = N_SEQUENCES) -> RepeatedProbe:
    """Random sequences repeated once, within the model's context."""
    pool = allowed_tokens(d_vocab, excluded | ({prefix} if prefix is not None else set()))
    room = n_ctx - (prefix is not None)
    half = min(MAX_HALF_LENGTH, room // 2, len(pool))
    if half < 2:
        raise ValueError(
            f"the model's context ({n_ctx}) or vocabulary ({len(pool)} usable tokens) is too small for a repeated-sequence probe"
        )
    generator = torch.Generator().manual_seed(seed)
    rows = torch.stack([pool[torch.randperm(len(pool), generator=generator)[:half]] for _ in range(n)])
    parts = [rows, rows] if prefix is None else [torch.full((n, 1), prefix), rows, rows]
    return RepeatedProbe(torch.cat(parts, dim=1), prefix, half)


def ov_tokens(answers: torch.Tensor, wrong: torch.Tensor, d_vocab: int, excluded: set[int], seed: int) -> tuple[torch.Tensor, str]:
    """(token ids, which set) for the OV-circuit roles."""
    ids = torch.cat([answers.flatten(), wrong.flatten()])
    ids = torch.unique(ids[ids >= 0]).cpu()
    if len(ids) >= MIN_ANSWER_TOKENS:
        return ids, "answer_tokens"
    pool = allowed_tokens(d_vocab, excluded)
    if len(pool) > MAX_VOCAB_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=generator)[:MAX_VOCAB_SAMPLE]].sort().values
    return pool, "vocabulary_sample"
