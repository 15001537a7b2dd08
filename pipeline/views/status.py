"""Tables in the terminal: the stages (`dalle status`, once or redrawn with `--watch`) and the
cluster's jobs (`dalle jobs`)."""

from __future__ import annotations

import datetime
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pipeline import workflow
from pipeline.config.recipe import Recipe
from pipeline.stages.base import StageStatus

COLUMNS = (
    "stage",
    "state",
    "shards",
    "samples in",
    "samples out",
    "drops / failures by reason",
    "failed",
    "last update",
)


def when(ts: float | None) -> str:
    """A Unix time as local date and time, "-" for none."""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def progress_text(row: StageStatus) -> str:
    """Training steps while a model stage trains, else shards done of planned."""
    if row.training is not None and row.state != "complete":
        return f"step {row.training.step}/{row.training.steps}"
    return f"{row.shards_done}/{'?' if row.shards_total is None else row.shards_total}"


def status_table(rows: list[StageStatus]) -> Group:
    """The stage table, with each failed shard's first error under it, then each stage's line
    about its failed rows (`FailedShare`)."""
    table = Table(title="stages")
    for col in COLUMNS:
        table.add_column(col)
    for r in rows:
        reasons = "\n".join(f"{k} {v}" for k, v in r.counts.items() if v) or "-"
        table.add_row(
            r.stage,
            r.state,
            progress_text(r),
            str(r.samples_in),
            str(r.samples_out),
            reasons,
            str(r.failures),
            when(r.last_update),
        )
    failures = [Text(f"  {r.stage} failed shard {e}") for r in rows for e in r.failure_examples]
    warnings = [Text(f"  {r.warning}", style="yellow") for r in rows if r.warning]
    return Group(table, *failures, *warnings)


def console() -> Console:
    return Console(width=max(130, Console().width))


def print_status(rows: list[StageStatus]) -> None:
    console().print(status_table(rows))


def print_jobs(rows: list[dict]) -> None:
    """The cluster's jobs (`pipeline.cluster.jobs.list_jobs`), newest first."""
    table = Table(title="jobs")
    for col in ("id", "status", "recipe", "output_dir", "started", "ended", "message"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"], r["status"], r["recipe"], r["output_dir"], when(r["start"]), when(r["end"]), r["message"]
        )
    console().print(table)


def watch_status(recipe: Recipe, interval: float) -> None:
    """Redraws the stage table in place until interrupted (prints it again each time when not on
    a terminal)."""
    out = console()
    try:
        if not out.is_terminal:
            while True:
                out.print(status_table(workflow.status(recipe)))
                time.sleep(interval)
        with Live(status_table(workflow.status(recipe)), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(status_table(workflow.status(recipe)), refresh=True)
    except KeyboardInterrupt:
        pass
