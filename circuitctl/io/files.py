"""Atomic file writes and run directories that are never overwritten silently."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from circuitctl.errors import UsageError

RUN_MARKER = "circuit.json"
LOCK_FILE = ".circuitctl.lock"  # circuitctl.io.run_lock's, held by the run that prepares the directory

# Writes that fail because the storage is full: the one place they become a user-facing message.
STORAGE_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file too large (the file-size limit, ulimit -f, was reached)",
    errno.EDQUOT: "no space left (disk quota exceeded)",
}


def storage_error(exc: BaseException, path: Path | str | None = None) -> UsageError | None:
    """The UsageError (exit 2) for an OSError raised because the disk, the quota or the file-size
    limit is full; None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_FULL:
        return None
    where = path or exc.filename or "a file"
    return UsageError(
        f"{where}: {STORAGE_FULL[exc.errno]} while writing it; files written before (earlier results, the last "
        "checkpoint) are unchanged. Free space and rerun (an interrupted run with a checkpoint continues with --resume RUN_DIR)"
    )


_STAGE: ContextVar[tuple | None] = ContextVar("circuitctl_staged_writes", default=None)


@contextmanager
def staged_writes(directory: Path, unstaged: tuple[str, ...] = ("checkpoint",)) -> Iterator[None]:
    """Inside the block, `write_atomic` into `directory` writes each file's data to its temporary
    file and renames them all into place only when the block ends without an error: a run that
    fails part-way through writing its results (a full disk) replaces none of an earlier run's
    files. Subdirectories named in `unstaged` (checkpoints, which must commit as they go) are
    written at once."""
    pending: list[tuple[str, Path]] = []
    token = _STAGE.set((Path(directory).resolve(), pending, unstaged))
    try:
        yield
    except BaseException:
        for tmp, _ in pending:
            Path(tmp).unlink(missing_ok=True)
        raise
    else:
        for tmp, path in pending:
            os.replace(tmp, path)
    finally:
        _STAGE.reset(token)


def commit_staged() -> None:
    """Put the files written so far inside `staged_writes` in place now: the results a run has
    finished writing, before steps that read them back (the explanation, the viewer page)."""
    stage = _STAGE.get()
    if stage is None:
        return
    pending = stage[1]
    for tmp, path in pending:
        os.replace(tmp, path)
    pending.clear()


def _staged(path: Path) -> list | None:
    """The pending list when `path` is to be staged, else None."""
    stage = _STAGE.get()
    if stage is None:
        return None
    directory, pending, unstaged = stage
    try:
        relative = path.resolve().relative_to(directory)
    except ValueError:
        return None
    return None if relative.parts[:1] and relative.parts[0] in unstaged else pending


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file,
    and a write that fails (a full disk) leaves the previous file as it was. Inside
    `staged_writes` the rename waits for the end of the block."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        pending = _staged(path)
        if pending is None:
            os.replace(tmp, path)
        else:
            pending.append((tmp, path))
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        full = storage_error(exc, path)
        if full is not None:
            raise full from exc
        raise


def write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def prepare_run_dir(path: Path, force: bool) -> Path:
    """Create (or, with force, reuse) a run directory; refuse to clobber an earlier run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output.dir '{path}' exists and is not a directory")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not force:
        what = "holds an earlier run" if (path / RUN_MARKER).exists() else "is not empty"
        raise UsageError(f"output.dir '{path}' {what}; choose another output.dir or pass --force to replace its files")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".circuitctl-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output.dir '{path}' cannot be written: {exc.strerror or exc}") from exc
    return path


def remove_if_empty(path: Path) -> None:
    """Remove a directory that holds nothing (e.g. the run directory of a run that failed)."""
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or already gone


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; pass --force to replace it (or --out to write elsewhere)")
