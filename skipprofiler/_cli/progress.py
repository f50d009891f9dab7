"""Progress bars with ETA on stderr: one line per running stage the library reports (skipprofiler.progress).

The bars are transient: a finished stage leaves the display, and nothing is left behind when the command ends or
fails (its error stays one line); on a non-terminal stderr nothing is drawn."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..progress import StageProgress
from .errors import in_option_words


def _columns():
    from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())


class StageBars:
    """A `skipprofiler.progress` callback drawing each running stage as a rich progress bar."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, event: StageProgress) -> None:
        task = self.tasks.get(event.stage)
        if task is None:
            task = self.tasks[event.stage] = self.progress.add_task(event.stage, total=event.total)
        total = event.total if event.total is not None else (event.done if event.finished else None)
        self.progress.update(task, completed=event.done, total=total)
        if event.finished:
            self.progress.remove_task(task)
            del self.tasks[event.stage]  # a later stage of the same name gets a bar of its own

    def log(self, message: str) -> None:
        """A note above the bars (library words printed as options, errors.in_option_words)."""
        self.progress.console.print(in_option_words(message), highlight=False, markup=False)

    @contextmanager
    def spinner(self, description: str) -> Iterator[None]:
        """A stage with no steps to count (loading a model)."""
        task = self.progress.add_task(description, total=None)
        try:
            yield
        finally:
            self.progress.remove_task(task)


@contextmanager
def stage_bars(quiet: bool = False) -> Iterator[StageBars]:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True, quiet=quiet)
    with Progress(*_columns(), console=console, transient=True, disable=not console.is_terminal) as progress:
        yield StageBars(progress)
