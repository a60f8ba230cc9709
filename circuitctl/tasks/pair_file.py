"""A JSONL file of prompt pairs, validated in one streaming pass and read lazily.

A task file may hold 100,000 pairs or more. `PairFile` checks every line when it is opened
(one pass, a progress bar, every problem naming its line) and keeps only each pair's byte
offset and line number (16 bytes a pair); pairs are parsed again when they are used:
`iter()` streams the file, `take(indices)` reads only the chosen lines (an `n_pairs`
subsample), `len()` is known. Memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import json
from array import array
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from circuitctl.errors import UsageError

# Report progress every this many bytes (advancing a rich bar for every line would cost more than the parsing).
_PROGRESS_STEP = 1 << 20


def _record(raw: bytes, path: Path, number: int):
    """The JSON value of one line, or None for a blank line; UsageError naming the line otherwise."""
    try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} line {number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise UsageError(f"{path} line {number}: JSON nested too deeply for a prompt pair") from None


def _pair(raw: bytes, path: Path, number: int, make: Callable):
    record = _record(raw, path, number)
    return None if record is None else make(record, f"{path} line {number}", number)


class PairFile(Sequence):
    """The prompt pairs of a JSONL file (a read-only sequence of `PromptPair`). `make(record,
    where, line)` checks one JSON record and makes its pair (`records.pair_from_record`)."""

    def __init__(self, path: Path, make: Callable) -> None:
        self.path = Path(path)
        self.make = make
        self._offsets = array("q")  # byte offset of each pair's line
        self._lines = array("q")  # 1-based line number of each pair
        self._scan()

    def _scan(self) -> None:
        from circuitctl.progress import bar

        if not self.path.is_file():
            raise UsageError(f"task pairs file '{self.path}' does not exist")
        size = self.path.stat().st_size
        offset = reported = 0
        with open(self.path, "rb") as handle, bar(f"checking {self.path.name}", size) as advance:
            for number, raw in enumerate(handle, start=1):
                if _pair(raw, self.path, number, self.make) is not None:
                    self._offsets.append(offset)
                    self._lines.append(number)
                offset += len(raw)
                if offset - reported >= _PROGRESS_STEP:
                    advance(offset - reported)
                    reported = offset
        if not self._offsets:
            raise UsageError(f"{self.path}: the task has no prompt pairs")

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(len(self))[index])
        return self.take([index])[0]

    def __iter__(self) -> Iterator:
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                pair = _pair(raw, self.path, number, self.make)
                if pair is not None:
                    yield pair

    def take(self, indices: Iterable[int]) -> list:
        """The pairs at `indices`, in that order, reading only their lines."""
        indices = [range(len(self))[i] for i in indices]  # IndexError for an index out of range, negatives allowed
        found = {}
        with open(self.path, "rb") as handle:
            for i in sorted(set(indices)):
                handle.seek(self._offsets[i])
                found[i] = _pair(handle.readline(), self.path, self._lines[i], self.make)
        return [found[i] for i in indices]
