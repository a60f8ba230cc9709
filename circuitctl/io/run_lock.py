"""One process at a time in a run directory.

Two `discover` runs given the same `output.dir`, or `--resume` of one run twice, would
interleave their files and checkpoints. `RunLock` takes an exclusive lock on
``RUN_DIR/.circuitctl.lock`` (``flock``: the kernel drops it when its process dies, so the lock
file of a killed run is simply taken over) and writes the holder's pid, command, host and
start time into it, so that the second process fails at once with a message naming the first.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from circuitctl.errors import UsageError

from circuitctl.io.files import LOCK_FILE


def current_command() -> str:
    """This process's command line as the user typed it (``circuitctl discover ...``)."""
    program = Path(sys.argv[0]).name if sys.argv else "python"
    if program in ("__main__.py", "circuitctl"):
        program = "circuitctl"
    return " ".join([program, *sys.argv[1:]])


class RunLock:
    """``with RunLock(run_dir, "output.dir"):`` holds the run directory (creating it) for the block."""

    def __init__(self, run_dir: Path, what: str = "output.dir") -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_FILE
        self.what = what  # how the message names the directory: "output.dir", "--resume"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        if self.dir.exists() and not self.dir.is_dir():
            raise UsageError(f"{self.what} '{self.dir}' exists and is not a directory")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{self.what} '{self.dir}' cannot be written: {exc.strerror or exc}") from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(f"{self.what} '{self.dir}' cannot be written: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UsageError(self._busy_message(holder)) from None
            # the previous holder may have removed the file between our open and our lock
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        record = {
            "pid": os.getpid(),
            "command": current_command(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.write(fd, (json.dumps(record) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiting process then finds a fresh file
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def _busy_message(self, holder: dict) -> str:
        who = f"pid {holder.get('pid', '?')}"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            who += f" on host {holder['host']}"
        command = holder.get("command")
        started = holder.get("started")
        return (
            f"{self.what} '{self.dir}' is in use by another circuitctl process ({who}"
            + (f", started {started}" if started else "")
            + (f": {command}" if command else "")
            + "); wait for it to finish, or choose another output.dir"
        )


def _read_holder(fd: int, wait: float = 1.0) -> dict:
    """The holder's record (it writes it right after locking: wait a moment for it)."""
    deadline = time.monotonic() + wait
    while True:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode(errors="replace")
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                return record
        except json.JSONDecodeError:
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)
