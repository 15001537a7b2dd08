"""Runs a stage's shard tasks, with one set of rules whether they run as Ray tasks or on a pool
of actors.

The rules:
- a shard whose record is in the ledger is skipped (and counted done on the progress bar);
- each shard is tried up to 1 + `retries` times, every try in its own `Attempt`, which commits
  the shard (ledger record last) only when the try succeeded; tasks are idempotent, so a try
  that dies half-way (a lost worker) does no harm;
- a shard that gives up is recorded under `_failures/` with `errors.one_line` of its last
  error; the others still run, then the stage fails naming the first failed shard;
- progress (bar, Ray metrics, W&B) advances once per committed shard;
- the driver compacts the records into the ledger's summary every `COMPACT_EVERY_S` and at the
  end, so readers (`dalle status`, the dashboard, the next run) read a stage in a few requests.

Ray tasks (`Placement.actors` None) suit work whose setup is cheap (ingest, filter, text-tokenizer);
a pool keeps each actor's `setup()` (its models) across shards, one GPU per actor when the
cluster has them (encode, sample, evaluate). `pipeline.engine.runners` holds the two runners,
`pipeline.engine.tasks` what a stage hands them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from pipeline.engine.ledger import Ledger, ShardRecord
from pipeline.engine.tasks import PLACEMENT, Placement, ShardTask, ShardWorker
from pipeline.errors import StageFailed

log = logging.getLogger(__name__)

COMPACT_EVERY_S = 30.0


class Progress(Protocol):
    """Where the executor reports (`pipeline.observe.progress.StageProgress`)."""

    def start(self, label: str, total: int, done: int = 0) -> None: ...

    def advance(self, label: str, samples_per_s: float | None = None, record: ShardRecord | None = None) -> None: ...

    def failed(self, label: str) -> None: ...

    def finish(self, label: str) -> None: ...


def run_shards(
    ledger: Ledger,
    tasks: Sequence[ShardTask],
    worker: ShardWorker,
    *,
    fingerprint: str,
    label: str,
    progress: Progress,
    retries: int = 2,
    placement: Placement = PLACEMENT,
) -> dict[str, ShardRecord]:
    """Runs every task not yet in `ledger` (see the module docstring); returns the records of all
    of `tasks`, old and new. Raises StageFailed when some shards gave up."""
    done = ledger.done()
    todo = [t for t in tasks if t.shard not in done]
    compacted = time.monotonic()
    progress.start(label, total=len(tasks), done=len(tasks) - len(todo))
    failed: dict[str, str] = {}
    if todo:
        where = f"{placement.actors} actors" if placement.actors else "Ray tasks"
        log.info("%s: %d of %d shards to run on %s", label, len(todo), len(tasks), where)
        # Ray is imported only where shards run: the stages' per-shard code works without it (GPU suite)
        from pipeline.engine.runners import on_pool, on_tasks

        runner = on_pool if placement.actors else on_tasks
        started, samples = time.monotonic(), 0
        try:
            for shard, outcome in runner(worker, ledger.root, todo, fingerprint, retries, placement):
                if isinstance(outcome, str):
                    failed[shard] = outcome
                    ledger.record_failure(shard, outcome)
                    progress.failed(label)
                    log.warning("%s: shard %s failed: %s", label, shard, outcome)
                    continue
                done[shard] = outcome
                samples += outcome.samples_out
                progress.advance(label, samples / max(time.monotonic() - started, 1e-6), outcome)
                if time.monotonic() - compacted > COMPACT_EVERY_S:
                    ledger.compact(done, len(tasks))
                    compacted = time.monotonic()
        except StageFailed as err:  # the runner itself could not run (a pool whose actors cannot start)
            raise StageFailed(f"stage '{label}': {err}") from None
        finally:
            ledger.compact(done, len(tasks))
    progress.finish(label)
    if failed:
        shard, error = min(failed.items())
        raise StageFailed(
            f"stage '{label}': {len(failed)} of {len(tasks)} shards failed after {retries} retries "
            f"(first: shard {shard}: {error}); rerun to retry them"
        )
    return {t.shard: done[t.shard] for t in tasks}
