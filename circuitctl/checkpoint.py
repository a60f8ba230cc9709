"""Resumable checkpoints of long runs, in ``RUN_DIR/checkpoint/``.

A checkpoint is a small JSON state plus named tensors (safetensors). ``state.json`` is the
commit point: it is written last, atomically, and names the tensor file it goes with, so an
interruption at any moment leaves either the previous checkpoint or the new one, never a
mix. The run's config hash (`circuitctl.config.load.config_hash`: every section but `output`) is
recorded so that resuming with a different config is refused instead of silently mixing two runs.

`Autosave` writes a method's latest consistent progress every few seconds and on Ctrl-C, and
`hold_interrupts` delays a Ctrl-C until an in-place update (an optimizer step) is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from circuitctl.errors import InterruptedRun, UsageError
from circuitctl.io.files import write_atomic, write_json

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FORMAT_VERSION = 2  # 2: state.json records checksums of itself and of the tensor file


class Checkpoint:
    """Save and load one method's progress in ``run_dir/checkpoint``."""

    def __init__(self, run_dir: Path, fingerprint: str) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.fingerprint = fingerprint

    @property
    def exists(self) -> bool:
        return (self.dir / STATE_FILE).is_file()

    def recorded_fingerprint(self) -> str | None:
        if not self.exists:
            return None
        return self._read_state().get("fingerprint")

    def check(self) -> None:
        """Refuse (UsageError) a checkpoint written by a different config."""
        recorded = self.recorded_fingerprint()
        if recorded is not None and recorded != self.fingerprint:
            raise UsageError(
                f"{self.dir}: this checkpoint was written by a different config (fingerprint {recorded}, "
                f"this config {self.fingerprint}); resume with the same config file and overrides as the "
                "interrupted run (only output.dir may differ)"
            )

    def save(self, method: str, state: dict[str, Any], tensors: dict) -> None:
        """Atomically replace the checkpoint with `state` (JSON-serialisable) and `tensors`."""
        from safetensors.torch import save

        self.dir.mkdir(parents=True, exist_ok=True)
        record = self._read_state() if self.exists else {}
        previous, generation = record.get("tensor_file"), record.get("generation", 0) + 1
        tensor_file = f"tensors-{generation}.safetensors"
        blob = save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
        write_atomic(self.dir / tensor_file, blob)
        record = {
            "format": FORMAT_VERSION,
            "method": method,
            "fingerprint": self.fingerprint,
            "generation": generation,
            "tensor_file": tensor_file,
            "tensor_sha256": hashlib.sha256(blob).hexdigest(),
            "state": state,
        }
        record["checksum"] = _checksum(record)
        try:
            write_json(self.dir / STATE_FILE, record)
        except BaseException:  # e.g. a full disk: the previous checkpoint stays the one state.json names
            (self.dir / tensor_file).unlink(missing_ok=True)
            raise
        if previous and previous != tensor_file:
            (self.dir / previous).unlink(missing_ok=True)

    def load(self, method: str) -> tuple[dict[str, Any], dict] | None:
        """(state, tensors) of the checkpoint, or None if there is none."""
        if not self.exists:
            return None
        self.check()
        record = self._read_state()
        if record.get("method") != method:
            raise UsageError(f"{self.dir}: the checkpoint belongs to method '{record.get('method')}', not '{method}'")
        return record["state"], self._read_tensors(record)

    def clear(self) -> None:
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            path.unlink()
        os.rmdir(self.dir)

    def _read_state(self) -> dict[str, Any]:
        """state.json, verified against its checksum: a truncated or altered file is refused, never
        used and never replaced (a resumed run must not silently start over)."""
        path = self.dir / STATE_FILE
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise UsageError(f"{path}: unreadable checkpoint ({_short(exc)}); {_LEFT_AS_IS.format(dir=self.dir)}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("state"), dict):
            raise UsageError(f"{path}: not a checkpoint state (no 'state' mapping); {_LEFT_AS_IS.format(dir=self.dir)}")
        if record.get("format", 1) >= 2 and record.get("checksum") != _checksum(record):
            raise UsageError(
                f"{path}: corrupt checkpoint (its checksum does not match its contents: the file was truncated or "
                f"changed); {_LEFT_AS_IS.format(dir=self.dir)}"
            )
        return record

    def _read_tensors(self, record: dict[str, Any]) -> dict:
        """The checkpoint's tensors, verified against the checksum that state.json records."""
        from safetensors.torch import load

        path = self.dir / str(record.get("tensor_file"))
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"{path}: the checkpoint's tensor file cannot be read ({_short(exc)}); {_LEFT_AS_IS.format(dir=self.dir)}") from exc
        expected = record.get("tensor_sha256")
        if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
            raise UsageError(
                f"{path}: corrupt checkpoint tensors (the file's checksum does not match the one state.json records: "
                f"it was truncated or changed); {_LEFT_AS_IS.format(dir=self.dir)}"
            )
        try:
            return load(blob)
        except Exception as exc:  # safetensors raises its own error types for malformed files
            raise UsageError(f"{path}: unreadable checkpoint tensors ({_short(exc)}); {_LEFT_AS_IS.format(dir=self.dir)}") from exc


_LEFT_AS_IS = "it is left as it is; delete {dir} to start the run over"


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _checksum(record: dict[str, Any]) -> str:
    """SHA-256 of a state record without its own checksum, in canonical JSON."""
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Autosave:
    """Writes a method's progress to its checkpoint every `every` seconds (`maybe_save`, called
    between units of work) and on demand (`save`, e.g. on Ctrl-C). `snapshot()` returns
    (state, tensors) of the latest *consistent* progress, so a Ctrl-C at any moment finds one to
    save: the method replaces its progress object whole rather than changing it in place, or
    applies an in-place update inside `hold_interrupts`. Without a checkpoint nothing is written."""

    def __init__(self, checkpoint: Checkpoint | None, method: str, every: float, snapshot: Callable[[], tuple[dict, dict]]) -> None:
        self.checkpoint = checkpoint
        self.method = method
        self.every = every
        self.snapshot = snapshot
        self.last = time.monotonic()

    def load(self, resume: bool) -> tuple[dict[str, Any], dict] | None:
        """The saved (state, tensors) when resuming from an existing checkpoint, else None."""
        if not resume or self.checkpoint is None:
            return None
        return self.checkpoint.load(self.method)

    def save(self) -> None:
        if self.checkpoint is None:
            return
        state, tensors = self.snapshot()
        self.checkpoint.save(self.method, state, tensors)
        self.last = time.monotonic()

    def maybe_save(self) -> None:
        if self.checkpoint is not None and time.monotonic() - self.last >= self.every:
            self.save()

    def interrupted(self, what: str, command: str = "circuitctl discover CONFIG") -> InterruptedRun:
        """Save now, and the error that tells the user how to resume (only with a checkpoint)."""
        if self.checkpoint is None:
            raise ValueError("no checkpoint to resume from")
        self.save()
        return InterruptedRun(
            f"{what} stopped; its progress is saved in {self.checkpoint.dir}. "
            f"Resume with: {command} --resume {self.checkpoint.dir.parent}"
        )


@contextmanager
def hold_interrupts() -> Iterator[None]:
    """Delay a Ctrl-C (SIGINT) that arrives inside the block to its end, so that an in-place
    update in the block is applied whole or not at all. Only in the main thread and when
    Ctrl-C raises KeyboardInterrupt as usual; otherwise a no-op."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
