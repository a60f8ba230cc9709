"""Induction on repeated random tokens (Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"; Olsson et al. 2022, "In-context Learning and Induction Heads").

Clean: random tokens r1..rk followed by r1..r(k-1); the answer is rk, which only copying from the
first half predicts. Corrupt: the same first half followed by k-1 different random tokens, so
nothing repeats. The wrong answer is a random token absent from both prompts (a baseline for
logit-difference metrics).

By default prompts are text: tokens are drawn from the vocabulary and kept only if they
round-trip (a space plus letters, which decodes and re-encodes to the same single id, so any
concatenation of them tokenizes back to the drawn ids). With `as_ids=True` the record holds
token ids instead: clean and corrupt are lists of ints, answers and wrong answers are ints, and
any non-special token may be drawn.
"""

from __future__ import annotations

import random
import re

from circuitctl.errors import UsageError
from circuitctl.tasks.generators.registry import register_generator
from circuitctl.tasks.generators._common import Rejected, Tokenizer, encode, make_record, sample_records

_WORD_TOKEN = re.compile(r" [A-Za-z]+")


def _vocab_size(tokenizer: Tokenizer, vocab_size: int | None) -> int:
    if vocab_size is not None:
        size = vocab_size
    else:
        size = getattr(tokenizer, "vocab_size", None)
        if size is None and hasattr(tokenizer, "__len__"):
            size = len(tokenizer)
    if isinstance(size, bool) or not isinstance(size, int) or size < 2:
        raise UsageError(f"induction: cannot tell this tokenizer's vocabulary size; pass vocab_size (got {size!r})")
    return size


@register_generator("induction", "repeated random tokens: predict the continuation of a repeat")
def generate_induction(
    tokenizer: Tokenizer,
    n: int,
    seed: int = 0,
    *,
    seq_len: int = 10,
    as_ids: bool = False,
    vocab_size: int | None = None,
) -> list[dict]:
    """Induction records with `seq_len` (k) random tokens repeated once (prompt length 2k-1).
    Positions: first_occurrence (first occurrence of the last token, r(k-1)), answer_source
    (first occurrence of the answer rk, which induction heads attend to), end."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise UsageError(f"induction: seq_len must be an integer >= 2, got {seq_len!r}")
    size = _vocab_size(tokenizer, vocab_size)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    usable: dict[int, bool] = {}  # memo: the round-trip check costs an encode and a decode

    def is_usable(token: int) -> bool:
        if token not in usable:
            if token in special:
                usable[token] = False
            elif as_ids:
                usable[token] = True
            else:
                text = tokenizer.decode([token])
                usable[token] = bool(_WORD_TOKEN.fullmatch(text)) and encode(tokenizer, text) == [token]
        return usable[token]

    def draw(rng: random.Random, count: int) -> list[int]:
        """`count` distinct usable tokens."""
        drawn: list[int] = []
        for _ in range(50 * count):
            token = rng.randrange(size)
            if token not in drawn and is_usable(token):
                drawn.append(token)
                if len(drawn) == count:
                    return drawn
        raise Rejected(f"found only {len(drawn)} of {count} usable tokens")

    k = seq_len

    def candidate(rng):
        tokens = draw(rng, 2 * k)
        first, fresh, wrong = tokens[:k], tokens[k : 2 * k - 1], tokens[2 * k - 1]
        clean_ids, corrupt_ids = first + first[:-1], first + fresh
        positions = {"first_occurrence": k - 2, "answer_source": k - 1, "end": 2 * k - 2}
        if as_ids:
            return make_record(tokenizer, clean=clean_ids, corrupt=corrupt_ids, answers=[first[-1]],
                               wrong_answers=[wrong], positions=positions)
        clean, corrupt = tokenizer.decode(clean_ids), tokenizer.decode(corrupt_ids)
        if encode(tokenizer, clean) != clean_ids or encode(tokenizer, corrupt) != corrupt_ids:
            raise Rejected("the prompt text does not tokenize back to the drawn tokens")
        return make_record(
            tokenizer,
            clean=clean,
            corrupt=corrupt,
            answers=[tokenizer.decode([first[-1]])],
            wrong_answers=[tokenizer.decode([wrong])],
            positions=positions,
        )

    hint = (
        "text prompts need tokens that decode to a space plus letters and encode back to themselves (a "
        "SentencePiece tokenizer with a dummy prefix decodes a lone token without its space); use as_ids: true"
    )
    return sample_records("induction", n, seed, candidate, hint=None if as_ids else hint)
