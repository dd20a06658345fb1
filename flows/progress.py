"""A progress bar for long flow stages: drawn on a terminal, and published as a Prefect progress artifact so the
UI shows it too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from vidtune.tasks.progress import progress_artifact


@contextmanager
def progress_bar(label: str, total: int, key: str | None = None) -> Iterator[Callable[[], None]]:
    """Yields `advance()`. With `key`, the same progress goes to the Prefect artifact `key`."""
    console = Console(stderr=True)
    columns = (
        TextColumn(f"{label:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    publish = progress_artifact(key, total, f"{label}: {total} items")
    with (
        Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as progress,
        publish as report,
    ):
        bar = progress.add_task(label, total=total)
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1
            progress.advance(bar)
            report(done)

        yield advance
