"""Progress of long library calls: the library reports stages and steps, the caller decides how to show them.

A stage is one piece of work with a known number of steps ("dense pass", 12 batches; "plan demo-static-25", 9
steps). The library calls `progress.stage(name, total)` and ticks each step; every change reaches the caller's
callback as a `StageProgress`. `skipprof` draws them as rich progress bars with ETA (skipprofiler._cli.progress); a
library user passes any callable, or nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class StageProgress:
    stage: str  # what is being done, e.g. "dense pass" or "plan demo-static-25"
    done: int  # steps finished
    total: int | None  # steps in the stage (>= 1); None when not known in advance (a search)
    finished: bool = False  # the stage is over (done == total unless it failed)
    seconds: float = 0.0  # since the stage started


ProgressCallback = Callable[[StageProgress], None]


class Progress:
    """Reports stages to a callback (none: reports nothing)."""

    def __init__(self, callback: ProgressCallback | None = None):
        self.callback = callback

    @contextmanager
    def stage(self, name: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """`with progress.stage("dense pass", len(batches)) as tick: ... tick()` (tick(n) for n steps at once)."""
        total = None if total is None else max(int(total), 1)
        started = time.perf_counter()
        done = 0

        def emit(finished: bool = False) -> None:
            if self.callback is not None:
                self.callback(StageProgress(name, done, total, finished, time.perf_counter() - started))

        def tick(steps: int = 1) -> None:
            nonlocal done
            done = done + steps if total is None else min(done + steps, total)
            emit()

        emit()
        try:
            yield tick
        except BaseException:
            emit(finished=True)  # failed: done stays where it stopped
            raise
        if total is not None:
            done = total  # a stage that ends normally is complete, ticked or not (one-step stages never tick)
        emit(finished=True)


def as_progress(progress: Progress | ProgressCallback | None) -> Progress:
    """A `Progress` from whatever a caller passed: one already, a callback, or None."""
    return progress if isinstance(progress, Progress) else Progress(progress)
