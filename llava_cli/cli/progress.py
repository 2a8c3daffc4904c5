"""Rich progress bars for the CLI. Core functions take a plain ``on_progress(completed, total)`` callback."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

ProgressFn = Callable[[int, int], None]

# soft_wrap: a message line (a path, an error) is never hard-wrapped at 80 columns in a log file.
stderr = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, *, unit: str = "bytes", quiet: bool = False) -> Iterator[ProgressFn]:
    """A progress bar on stderr; yields the callback to feed it. ``unit`` is "bytes" or a count noun."""
    if quiet:
        yield lambda completed, total: None
        return
    columns = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn(), TextColumn(unit)]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(completed: int, total: int) -> None:
            progress.update(task, completed=completed, total=total)

        yield update
