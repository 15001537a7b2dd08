"""Progress bars for stages: shards done/total and samples/s, one bar per stage (rich)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class StageProgress:
    """One rich Progress shared by the stages of a run; quiet when `enabled` is False."""

    def __init__(self, enabled: bool = True):
        self._progress = Progress(
            TextColumn("[bold]{task.description:<15}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            disable=not enabled,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, label: str, total: int, done: int = 0, unit: str = "shards") -> None:
        if label in self._tasks:
            self._progress.update(self._tasks[label], total=total, completed=done, unit=unit)
        else:
            self._tasks[label] = self._progress.add_task(label, total=total, completed=done, rate="", unit=unit)

    def advance(self, label: str, samples_per_s: float | None = None) -> None:
        rate = f"{samples_per_s:,.0f} samples/s" if samples_per_s is not None else ""
        self._progress.update(self._tasks[label], advance=1, rate=rate)

    def update(self, label: str, done: int, samples_per_s: float | None = None) -> None:
        """Sets the bar to `done` units (training steps rather than shards)."""
        rate = f"{samples_per_s:,.0f} samples/s" if samples_per_s is not None else ""
        self._progress.update(self._tasks[label], completed=done, rate=rate)

    def finish(self, label: str) -> None:
        task = self._tasks[label]
        self._progress.update(task, completed=self._progress.tasks[task].total)
