"""Runs a stage's shard tasks as Ray tasks: skips what the ledger holds, bounds what is in
flight, retries, records failures, and drives the stage's progress bar.

A shard task function takes its payload, writes its shard under a temporary name, commits it
(ledger record last) and returns the `ShardRecord`. Tasks are idempotent, so Ray may run one
twice (a retry after a lost worker) without harm.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.ledger import Ledger, ShardRecord
from pipeline.progress import StageProgress

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """Some shard tasks of a stage gave up after their retries."""


@dataclass(frozen=True)
class ShardTask:
    shard: str
    payload: Any


def first_line(err: BaseException) -> str:
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(cause).__name__


def run_tasks(
    ledger: Ledger,
    tasks: list[ShardTask],
    fn: Callable[[Any], ShardRecord],
    *,
    label: str,
    progress: StageProgress,
    num_cpus: float = 1.0,
    max_retries: int = 2,
) -> dict[str, ShardRecord]:
    """Runs every task not yet in the ledger; returns all records of `tasks` (old and new)."""
    done = ledger.done()
    wanted = {t.shard for t in tasks}
    todo = [t for t in tasks if t.shard not in done]
    progress.start(label, total=len(tasks), done=sum(1 for s in done if s in wanted))
    if todo:
        log.info("%s: %d of %d shards to run", label, len(todo), len(tasks))
    remote = ray.remote(fn).options(num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=True)
    window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1) / num_cpus))
    pending: dict[ray.ObjectRef, ShardTask] = {}
    queue = list(reversed(todo))
    failed: dict[str, str] = {}
    started = time.monotonic()
    samples = 0
    while queue or pending:
        while queue and len(pending) < window:
            task = queue.pop()
            pending[remote.remote(task.payload)] = task
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            task = pending.pop(ref)
            try:
                record: ShardRecord = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a user-facing summary of a remote failure
                failed[task.shard] = first_line(err)
                ledger.record_failure(task.shard, failed[task.shard])
                progress.failed(label)
                log.warning("%s: shard %s failed: %s", label, task.shard, failed[task.shard])
                continue
            done[task.shard] = record
            samples += record.samples_out
            progress.advance(label, samples / max(time.monotonic() - started, 1e-6), record)
    progress.finish(label)
    if failed:
        shard, error = next(iter(sorted(failed.items())))
        raise StageFailed(
            f"stage '{label}': {len(failed)} of {len(tasks)} shards failed after {max_retries} retries "
            f"(first: shard {shard}: {error}); rerun to retry them"
        )
    return {t.shard: done[t.shard] for t in tasks}
