"""A rich progress bar over MetaSchedule trials, on stderr."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def bar(total: int, enabled: bool = True):
    """Yield ``advance(n, description=None)``; a no-op when not ``enabled``."""
    if not enabled:
        yield lambda n, description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("tuning [bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("trials"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        tid = progress.add_task("", total=total)

        def advance(n: int, description: str | None = None) -> None:
            if description is not None:
                progress.update(tid, description=description[:48])
            progress.advance(tid, n)

        yield advance
