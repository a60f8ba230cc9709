"""Progress bars (rich) for every loop that can take more than a second.

Bars go to stderr and only when it is a terminal, so logs from shell scripts stay clean.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_enabled = True
_active: Progress | None = None  # the bar being shown; nested bars join it


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar; yields `advance(n=1)`. A bar opened inside another one (a method's loop
    inside a loop over reruns) is a second line of the same display: rich shows one at a time."""
    global _active
    if not (_enabled and console.is_terminal):
        yield lambda n=1: None
        return
    if _active is not None:
        progress = _active
        task = progress.add_task(description, total=total)
        try:
            yield lambda n=1: progress.advance(task, n)
        finally:
            progress.remove_task(task)
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        _active = progress
        try:
            yield lambda n=1: progress.advance(task, n)
        finally:
            _active = None
