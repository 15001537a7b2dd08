"""Progress of a run's stages: a rich progress bar per stage (shards done/total and samples/s),
the same figures as named Ray metrics (`pipeline.observe.metrics`) when given a `StageMetrics`, and the
W&B runs of the stages that do not train (`pipeline.observe.stage_runs`) when given a `StageRuns`."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from pipeline.engine.ledger import ShardRecord
    from pipeline.observe.metrics import StageMetrics
    from pipeline.observe.stage_runs import StageRuns


class StageProgress:
    """One rich Progress shared by the stages of a run; quiet when `enabled` is False."""

    def __init__(self, enabled: bool = True, metrics: StageMetrics | None = None, runs: StageRuns | None = None):
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
        self.metrics = metrics
        self.runs = runs
        self._failures: dict[str, int] = {}

    def _done(self, label: str) -> int:
        return int(self._progress.tasks[self._tasks[label]].completed)

    def __enter__(self) -> StageProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
        if self.runs:
            self.runs.close()
        if self.metrics:
            self.metrics.close()

    def start(self, label: str, total: int, done: int = 0, unit: str = "shards", track: bool = True) -> None:
        """A stage's bar (again, for a stage in phases); `track=False` for a stage already complete."""
        if label in self._tasks:
            self._progress.update(self._tasks[label], total=total, completed=done, unit=unit)
        else:
            self._tasks[label] = self._progress.add_task(label, total=total, completed=done, rate="", unit=unit)
        if self.metrics:
            self.metrics.planned(label, total, done)
        if self.runs and track:
            self.runs.start(label)

    def advance(self, label: str, samples_per_s: float | None = None, record: ShardRecord | None = None) -> None:
        """One more shard done (`record`: its ledger record, for the sample and drop counts)."""
        rate = f"{samples_per_s:,.0f} samples/s" if samples_per_s is not None else ""
        self._progress.update(self._tasks[label], advance=1, rate=rate)
        if self.metrics:
            self.metrics.progressed(label, self._done(label), samples_per_s)
            if record is not None:
                self.metrics.committed(label, record)
        if self.runs:
            self.runs.shard(label, self._done(label), samples_per_s, record)

    def failed(self, label: str) -> None:
        """A shard task gave up."""
        self._failures[label] = self._failures.get(label, 0) + 1
        if self.metrics:
            self.metrics.failed(label)
        if self.runs:
            self.runs.failed(label, self._failures[label])

    def update(self, label: str, done: int, samples_per_s: float | None = None) -> None:
        """Sets the bar to `done` units (training steps rather than shards)."""
        rate = f"{samples_per_s:,.0f} samples/s" if samples_per_s is not None else ""
        self._progress.update(self._tasks[label], completed=done, rate=rate)
        if self.metrics:
            self.metrics.progressed(label, done, samples_per_s)

    def finish(self, label: str) -> None:
        task = self._tasks[label]
        self._progress.update(task, completed=self._progress.tasks[task].total)
        if self.metrics:
            self.metrics.progressed(label, self._done(label), None)
        if self.runs:
            self.runs.finish(label)
