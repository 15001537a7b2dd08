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

Ray tasks (`Placement.pool` False) suit work whose setup is cheap (ingest, filter, text-tokenizer);
a pool keeps each actor's `setup()` (its models) across shards, with the GPUs the recipe gives each
actor (encode, sample, evaluate). A placement that asks for GPUs is checked first
(`pipeline.engine.resources.await_gpus`): it waits for an autoscaler to add them, or is refused in
one line, never run on CPUs instead. `pipeline.engine.runners` holds the two runners,
`pipeline.engine.tasks` what a stage hands them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from pipeline.engine.ledger import Ledger, ShardRecord
from pipeline.engine.resources import await_gpus, note_unused_gpus, pool_ask
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
    gpu_wait_s: float | None = None,
) -> dict[str, ShardRecord]:
    """Runs every task not yet in `ledger` (see the module docstring); returns the records of all
    of `tasks`, old and new. Raises StageFailed when some shards gave up, ClusterError when the
    GPUs `placement` asks for cannot be had (within `gpu_wait_s` seconds on a cluster; None: no
    limit)."""
    done = ledger.done()
    todo = [t for t in tasks if t.shard not in done]
    compacted = time.monotonic()
    progress.start(label, total=len(tasks), done=len(tasks) - len(todo))
    failed: dict[str, str] = {}
    if todo:
        where = f"{placement.actors or 'an autoscaling pool of'} actors" if placement.pool else "Ray tasks"
        gpus = f" with {placement.gpus:g} GPUs each" if placement.gpus else " on CPUs"
        log.info("%s: %d of %d shards to run on %s%s", label, len(todo), len(tasks), where, gpus)
        ask = pool_ask(placement.section or label, placement.cpus, placement.gpus)
        if ask is not None:
            await_gpus(label, ask, gpu_wait_s)
        elif placement.pool:  # the stages with pools run models
            note_unused_gpus(label, f"{placement.section or label}.gpus_per_actor")
        # Ray is imported only where shards run: the stages' per-shard code works without it (GPU suite)
        from pipeline.engine.runners import on_pool, on_tasks

        runner = on_pool if placement.pool else on_tasks
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
