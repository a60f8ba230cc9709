"""Tokenized task data: the tensors every method works on.

Prompts are right-padded to one length. With causal attention, padding after a prompt
cannot influence its real tokens, so no attention mask is needed; each example's answer is
read at its own last real token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from circuitctl.errors import UsageError
from circuitctl.tasks.records import PromptPair, TaskSource


@dataclass(frozen=True)
class TaskData:
    """A batch (or the whole set) of tokenized prompt pairs."""

    clean: torch.Tensor  # [N, P] token ids
    corrupt: torch.Tensor  # [N, P]
    lengths: torch.Tensor  # [N] real tokens per prompt
    answers: torch.Tensor  # [N, A] answer ids, -1 = padding
    wrong: torch.Tensor  # [N, W] wrong-answer ids, -1 = padding (W may be 0)
    positions: dict[str, torch.Tensor]  # label -> [N] token index

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @property
    def answer_positions(self) -> torch.Tensor:
        return self.lengths - 1

    @property
    def real_tokens(self) -> torch.Tensor:
        """Bool [N, P]: which positions are real (not padding)."""
        return torch.arange(self.clean.shape[1], device=self.lengths.device)[None] < self.lengths[:, None]

    def slice(self, start: int, stop: int) -> "TaskData":
        return TaskData(
            self.clean[start:stop],
            self.corrupt[start:stop],
            self.lengths[start:stop],
            self.answers[start:stop],
            self.wrong[start:stop],
            {k: v[start:stop] for k, v in self.positions.items()},
        )

    def repeat(self, times: int) -> "TaskData":
        """The examples stacked `times` times (copy-major): metrics over K stacked trials or steps."""
        if times == 1:
            return self
        return TaskData(
            self.clean.repeat(times, 1),
            self.corrupt.repeat(times, 1),
            self.lengths.repeat(times),
            self.answers.repeat(times, 1),
            self.wrong.repeat(times, 1),
            {k: v.repeat(times) for k, v in self.positions.items()},
        )

    def to(self, device) -> "TaskData":
        return TaskData(
            self.clean.to(device),
            self.corrupt.to(device),
            self.lengths.to(device),
            self.answers.to(device),
            self.wrong.to(device),
            {k: v.to(device) for k, v in self.positions.items()},
        )

    def batches(self, batch_size: int):
        for start in range(0, self.n, batch_size):
            yield self.slice(start, min(start + batch_size, self.n))


def _where(pair: PromptPair, origin: str) -> str:
    return f"{origin} line {pair.line}" if pair.line else f"{origin} pair"


def _encode_prompt(prompt, tokenizer, bos: int | None, d_vocab: int, where: str, what: str) -> tuple[list[int], int]:
    """Token ids and the offset added in front (1 when a BOS token is prepended)."""
    if isinstance(prompt, list):
        ids, offset = list(prompt), 0
    else:
        if tokenizer is None:
            raise UsageError(f"{where}: '{what}' is text but the model has no tokenizer; give token ids instead")
        ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        offset = 0
        if bos is not None:
            ids, offset = [bos] + ids, 1
    bad = [t for t in ids if not 0 <= t < d_vocab]
    if bad:
        raise UsageError(f"{where}: '{what}' has token id {bad[0]} outside the vocabulary (0..{d_vocab - 1})")
    return ids, offset


def _encode_answer(answer, tokenizer, d_vocab: int, where: str, what: str) -> int:
    if isinstance(answer, int):
        if not 0 <= answer < d_vocab:
            raise UsageError(f"{where}: {what} id {answer} is outside the vocabulary (0..{d_vocab - 1})")
        return answer
    if tokenizer is None:
        raise UsageError(f"{where}: {what} '{answer}' is text but the model has no tokenizer")
    from circuitctl.tasks.tokens import piece_ids

    ids = piece_ids(tokenizer, answer)  # as the answer tokenizes after a prompt (SentencePiece dummy prefixes)
    if len(ids) != 1:
        raise UsageError(
            f"{where}: {what} {answer!r} is {len(ids)} tokens {ids}; answers must be single tokens "
            "(mind the leading space, e.g. ' Mary')"
        )
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and answer.strip() != getattr(tokenizer, "unk_token", None):
        raise UsageError(f"{where}: {what} {answer!r} is not in the tokenizer's vocabulary (it encodes as the unknown token)")
    return ids[0]


def tokenize_pairs(
    pairs, tokenizer, d_vocab: int, bos: int | None, origin: str, pad_id: int = 0, max_len: int | None = None
) -> TaskData:
    """Tokenize and validate prompt pairs; every problem names the line."""
    cleans, corrupts, answers, wrongs, positions = [], [], [], [], []
    labels = None
    for pair in pairs:
        where = _where(pair, origin)
        clean, offset = _encode_prompt(pair.clean, tokenizer, bos, d_vocab, where, "clean")
        corrupt, _ = _encode_prompt(pair.corrupt, tokenizer, bos, d_vocab, where, "corrupt")
        if len(clean) != len(corrupt):
            raise UsageError(
                f"{where}: clean prompt is {len(clean)} tokens but corrupt is {len(corrupt)}; "
                "paired prompts must have the same token length"
            )
        if max_len is not None and len(clean) > max_len:
            raise UsageError(f"{where}: prompt is {len(clean)} tokens, longer than the model's context ({max_len})")
        pos = {}
        for label, index in pair.positions.items():
            shifted = index + offset if index >= 0 else len(clean) + index
            if not 0 <= shifted < len(clean):
                raise UsageError(f"{where}: position '{label}' = {index} is outside the prompt ({len(clean) - offset} tokens)")
            pos[label] = shifted
        if labels is None:
            labels = set(pos)
        elif set(pos) != labels:
            raise UsageError(f"{where}: position labels {sorted(pos)} differ from the first pair's {sorted(labels)}")
        cleans.append(clean)
        corrupts.append(corrupt)
        answers.append([_encode_answer(a, tokenizer, d_vocab, where, "answer") for a in pair.answers])
        wrongs.append([_encode_answer(a, tokenizer, d_vocab, where, "wrong answer") for a in pair.wrong_answers])
        positions.append(pos)
    if not cleans:
        raise UsageError(f"{origin}: the task has no prompt pairs")
    length = max(map(len, cleans))

    def pad(rows, width, value):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)

    return TaskData(
        clean=pad(cleans, length, pad_id),
        corrupt=pad(corrupts, length, pad_id),
        lengths=torch.tensor([len(c) for c in cleans], dtype=torch.long),
        answers=pad(answers, max(map(len, answers)), -1),
        wrong=pad(wrongs, max(map(len, wrongs)), -1),
        positions={label: torch.tensor([p[label] for p in positions]) for label in sorted(labels or ())},
    )


def task_pairs(source: TaskSource, tokenizer, n_pairs: int | None, seed: int, options: dict) -> list[PromptPair]:
    """The pairs to use: shipped ones (subsampled reproducibly with the seed) or generated."""
    n = n_pairs or source.spec.n_pairs
    if source.pairs is None:
        from circuitctl.tasks.generators import generate
        from circuitctl.tasks.records import pair_from_record

        if tokenizer is None:
            raise UsageError(f"task '{source.spec.name}' is generated from text and needs a model with a tokenizer")
        records = generate(source.spec.generator, tokenizer, n or 100, seed, **{**source.spec.options, **options})
        return [pair_from_record(r, f"generator {source.spec.generator}") for r in records]
    pairs = list(source.pairs)
    if n is not None and n < len(pairs):
        pairs = random.Random(seed).sample(pairs, n)
    return pairs
