"""A progress bar over bytes (reading a dataset, downloading a model), drawn on a terminal's stderr only."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_bar(label: str, total: int, *, show: bool = True, speed: bool = False) -> Iterator[Callable | None]:
    """A transient bar over ``total`` bytes: yields its update function (``completed=`` or ``advance=``), or
    None when nothing is drawn (``show`` off, nothing to count, or stderr not a terminal)."""
    if not (show and total and sys.stderr.isatty()):
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [TextColumn(label), BarColumn(), DownloadColumn()]
    columns += [TransferSpeedColumn()] if speed else []
    bar = Progress(*columns, TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = bar.add_task(label, total=total)
    with bar:
        yield functools.partial(bar.update, task)
