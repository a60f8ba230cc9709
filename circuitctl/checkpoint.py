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
FORMAT_VERSION = 1


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

    def recorded_method(self) -> str | None:
        """The method whose progress the checkpoint holds (None: no checkpoint)."""
        return self._read_state().get("method") if self.exists else None

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
        write_json(
            self.dir / STATE_FILE,
            {
                "format": FORMAT_VERSION,
                "method": method,
                "fingerprint": self.fingerprint,
                "generation": generation,
                "tensor_file": tensor_file,
                "state": state,
            },
        )
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
        from safetensors.torch import load_file

        tensors = load_file(str(self.dir / record["tensor_file"]))
        return record["state"], tensors

    def clear(self) -> None:
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            path.unlink()
        os.rmdir(self.dir)

    def _read_state(self) -> dict[str, Any]:
        path = self.dir / STATE_FILE
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{path}: unreadable checkpoint ({exc}); delete the checkpoint folder to start over") from exc


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
