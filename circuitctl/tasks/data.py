"""Tokenized task data: the tensors every method works on.

Prompts are right-padded to one length. With causal attention, padding after a prompt
cannot influence its real tokens, so no attention mask is needed; each example's answer is
read at its own last real token.
"""

from __future__ import annotations

import random
from array import array
from dataclasses import dataclass

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

    def take(self, indices: torch.Tensor) -> "TaskData":
        """The examples at `indices` (a LongTensor; repeats allowed: a bootstrap resample), in that order."""
        indices = indices.to(self.clean.device)
        return TaskData(
            self.clean[indices],
            self.corrupt[indices],
            self.lengths[indices],
            self.answers[indices],
            self.wrong[indices],
            {k: v[indices.to(v.device)] for k, v in self.positions.items()},
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


def _encode_prompt(prompt, tokenizer, bos: int | None, d_vocab: int, where: str, what: str, encoded=None) -> tuple[list[int], int]:
    """Token ids and the offset added in front (1 when a BOS token is prepended). `encoded`: the
    ids of a text prompt when they were computed already (batch tokenization)."""
    if isinstance(prompt, list):
        ids, offset = list(prompt), 0
    else:
        if tokenizer is None:
            raise UsageError(f"{where}: '{what}' is text but the model has no tokenizer; give token ids instead")
        ids = list(encoded if encoded is not None else tokenizer.encode(prompt, add_special_tokens=False))
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


_CHUNK = 1024  # pairs tokenized together (one batched tokenizer call for their text prompts)


def _encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts: one batched call for HuggingFace tokenizers, else one call each."""
    if not texts:
        return []
    if callable(tokenizer):  # HuggingFace tokenizers: tokenizer(texts) encodes a batch at once
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def _chunks(pairs, size: int):
    chunk = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Rows:
    """Rows of token ids kept as one padded int64 block per chunk of pairs: 8 bytes an id (plus a
    chunk's padding), never a Python list per row for the whole task."""

    def __init__(self, pad: int) -> None:
        self.pad = pad
        self.blocks: list[torch.Tensor] = []
        self.pending: list[list[int]] = []

    def add(self, row: list[int]) -> None:
        self.pending.append(row)

    def close_chunk(self) -> None:
        if self.pending:
            width = max(map(len, self.pending))
            rows = [row + [self.pad] * (width - len(row)) for row in self.pending]
            self.blocks.append(torch.tensor(rows, dtype=torch.long, device="cpu").reshape(len(rows), width))
            self.pending = []

    def padded(self) -> torch.Tensor:
        """All rows, right-padded to the longest; the blocks are released as they are copied."""
        self.close_chunk()
        n, width = sum(b.shape[0] for b in self.blocks), max((b.shape[1] for b in self.blocks), default=0)
        out = torch.full((n, width), self.pad, dtype=torch.long, device="cpu")
        row = 0
        while self.blocks:
            block = self.blocks.pop(0)
            out[row : row + block.shape[0], : block.shape[1]] = block
            row += block.shape[0]
        return out


def _tensor(values: array) -> torch.Tensor:
    return torch.frombuffer(values, dtype=torch.int64).clone() if len(values) else torch.zeros(0, dtype=torch.long, device="cpu")


def tokenize_pairs(
    pairs, tokenizer, d_vocab: int, bos: int | None, origin: str, pad_id: int = 0, max_len: int | None = None
) -> TaskData:
    """Tokenize and validate prompt pairs; every problem names the line. Streams: `pairs` may be
    any iterable (a PairFile reads its file as it goes) and only token ids are kept."""
    from circuitctl.progress import bar

    clean_rows, corrupt_rows, answer_rows, wrong_rows = _Rows(pad_id), _Rows(pad_id), _Rows(-1), _Rows(-1)
    lengths = array("q")
    positions: dict[str, array] = {}
    labels = None
    answer_ids: dict = {}  # answer text -> id (answers repeat: names, digits)
    total = len(pairs) if hasattr(pairs, "__len__") else 0
    with bar("tokenizing pairs", total) as advance:
        for chunk in _chunks(pairs, _CHUNK):
            texts = [p for pair in chunk for p in (pair.clean, pair.corrupt) if isinstance(p, str)]
            encoded = iter(_encode_texts(tokenizer, texts) if tokenizer is not None else [])
            for pair in chunk:
                where = _where(pair, origin)
                clean_ids = next(encoded) if isinstance(pair.clean, str) and tokenizer is not None else None
                corrupt_ids = next(encoded) if isinstance(pair.corrupt, str) and tokenizer is not None else None
                clean, offset = _encode_prompt(pair.clean, tokenizer, bos, d_vocab, where, "clean", clean_ids)
                corrupt, _ = _encode_prompt(pair.corrupt, tokenizer, bos, d_vocab, where, "corrupt", corrupt_ids)
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
                    positions = {label: array("q") for label in labels}
                elif set(pos) != labels:
                    raise UsageError(f"{where}: position labels {sorted(pos)} differ from the first pair's {sorted(labels)}")
                answers = [_answer_id(a, tokenizer, d_vocab, where, "answer", answer_ids) for a in pair.answers]
                wrong = [_answer_id(a, tokenizer, d_vocab, where, "wrong answer", answer_ids) for a in pair.wrong_answers]
                same = set(answers) & set(wrong)
                if same:
                    raise UsageError(
                        f"{where}: an answer and a wrong answer are the same token (id {min(same)}); "
                        "the metric would compare it with itself"
                    )
                clean_rows.add(clean)
                corrupt_rows.add(corrupt)
                answer_rows.add(answers)
                wrong_rows.add(wrong)
                lengths.append(len(clean))
                for label, index in pos.items():
                    positions[label].append(index)
            for rows in (clean_rows, corrupt_rows, answer_rows, wrong_rows):
                rows.close_chunk()
            advance(len(chunk))
    if not lengths:
        raise UsageError(f"{origin}: the task has no prompt pairs")
    return TaskData(
        clean=clean_rows.padded(),
        corrupt=corrupt_rows.padded(),
        lengths=_tensor(lengths),
        answers=answer_rows.padded(),
        wrong=wrong_rows.padded(),
        positions={label: _tensor(positions[label]) for label in sorted(labels or ())},
    )


def _answer_id(answer, tokenizer, d_vocab: int, where: str, what: str, cache: dict) -> int:
    """`_encode_answer`, remembering text answers that encoded fine (errors are re-raised with their own line)."""
    if isinstance(answer, int) or answer not in cache:
        token = _encode_answer(answer, tokenizer, d_vocab, where, what)
        if not isinstance(answer, int):
            cache[answer] = token
        return token
    return cache[answer]


def task_pairs(source: TaskSource, tokenizer, n_pairs: int | None, seed: int, options: dict):
    """The pairs to use: the task's (subsampled reproducibly with the seed, reading only the chosen
    lines) or generated. The subsample is the one `random.Random(seed).sample(pairs, n)` takes."""
    n = n_pairs or source.spec.n_pairs
    if source.pairs is None:
        from circuitctl.tasks.generators import generate
        from circuitctl.tasks.records import pair_from_record

        if tokenizer is None:
            raise UsageError(f"task '{source.spec.name}' is generated from text and needs a model with a tokenizer")
        records = generate(source.spec.generator, tokenizer, n or 100, seed, **{**source.spec.options, **options})
        return [pair_from_record(r, f"generator {source.spec.generator}") for r in records]
    pairs = source.pairs
    if n is not None and n < len(pairs):
        # sample() picks by index from len() alone, so sampling range(len) picks the same pairs
        indices = random.Random(seed).sample(range(len(pairs)), n)
        return pairs.take(indices) if hasattr(pairs, "take") else [pairs[i] for i in indices]
    return pairs
