"""Helpers shared by the generators: tokenizing, single-token filters, record checks, sampling."""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Protocol, Sequence

from circuitctl.errors import UsageError
from circuitctl.tasks.tokens import encode, single_token_id  # noqa: F401 (the generators import them from here)

Record = dict[str, Any]
Prompt = str | list[int]


class Tokenizer(Protocol):
    """What a generator needs from a tokenizer (a HuggingFace tokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class Rejected(Exception):
    """A sampled candidate breaks a rule (e.g. a word is not one token); the sampler draws again."""


def single_token_words(tokenizer: Tokenizer, words: Iterable[str], prefix: str = " ") -> list[str]:
    """The words that are one token once `prefix` is put before them; order kept, duplicates dropped."""
    kept: list[str] = []
    for word in words:
        if word not in kept and single_token_id(tokenizer, prefix + word) is not None:
            kept.append(word)
    return kept


def require_words(task: str, what: str, words: Sequence, minimum: int, listed: int | None = None) -> None:
    """Fail clearly when a tokenizer leaves too few single-token words to sample from."""
    if len(words) < minimum:
        of = f" of {listed}" if listed is not None else ""
        kept = f" ({', '.join(repr(w) for w in list(words)[:5])})" if words else ""
        raise UsageError(
            f"{task}: only {len(words)}{of} {what} are single tokens for this tokenizer{kept}; the task needs "
            f"{minimum}. The generator's word lists are English words with a leading space; a tokenizer that "
            "splits them (or has no such tokens) cannot run this task: give the task as a JSONL file of pairs instead"
        )


def check_choice(task: str, option: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UsageError(f"{task}: option {option}={value!r} is not one of {', '.join(map(str, choices))}")


def locate(ids: Sequence[int], token_id: int, count: int) -> list[int]:
    """Indices of `token_id` in `ids`, which must occur exactly `count` times (else Rejected)."""
    found = [i for i, t in enumerate(ids) if t == token_id]
    if len(found) != count:
        raise Rejected(f"token {token_id} occurs {len(found)} times, expected {count}")
    return found


def make_record(
    tokenizer: Tokenizer,
    *,
    clean: Prompt,
    corrupt: Prompt,
    answers: list,
    wrong_answers: list,
    positions: dict[str, int],
) -> Record:
    """A checked record: answers are single tokens, clean and corrupt have equal token length, and
    every position lies inside the prompt. Prompts given as token-id lists are taken as they are."""
    clean_ids = clean if isinstance(clean, list) else encode(tokenizer, clean)
    corrupt_ids = corrupt if isinstance(corrupt, list) else encode(tokenizer, corrupt)
    if len(clean_ids) != len(corrupt_ids):
        raise Rejected(f"clean has {len(clean_ids)} tokens but corrupt has {len(corrupt_ids)}")
    for answer in [*answers, *wrong_answers]:
        if isinstance(answer, str) and single_token_id(tokenizer, answer) is None:
            raise Rejected(f"answer {answer!r} is not a single token")
    if not answers:
        raise Rejected("no answers")
    overlap = set(answers) & set(wrong_answers)
    if overlap:
        raise Rejected(f"{sorted(overlap)} are both right and wrong answers")
    for label, position in positions.items():
        if not 0 <= position < len(clean_ids):
            raise Rejected(f"position {label}={position} outside a {len(clean_ids)}-token prompt")
    return {
        "clean": clean,
        "corrupt": corrupt,
        "answers": list(answers),
        "wrong_answers": list(wrong_answers),
        "positions": dict(positions),
    }


def sample_records(
    task: str, n: int, seed: int, candidate: Callable[[random.Random], Record], hint: str = ""
) -> list[Record]:
    """Draw candidates from one seeded RNG until `n` are valid; give up clearly if most fail
    (`hint`: what to try then)."""
    rng = random.Random(seed)
    records: list[Record] = []
    attempts, limit = 0, 100 + 20 * n
    last_reason = ""
    while len(records) < n:
        if attempts >= limit:
            raise UsageError(
                f"{task}: only {len(records)} of {n} valid records after {attempts} candidates "
                f"(last rejection: {last_reason}); "
                + (hint or "this tokenizer splits the task's words or prompts differently from what the task needs")
            )
        attempts += 1
        try:
            records.append(candidate(rng))
        except Rejected as rejection:
            last_reason = str(rejection)
    return records
