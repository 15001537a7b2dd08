"""The two ways `pipeline.engine.executor.run_shards` runs shard tasks on Ray. Each yields
(shard, its committed record) or (shard, the one-line error it gave up with), and tries every
shard up to 1 + `retries` times: Ray retries a task (on any error, or a lost worker), a pool
actor retries a shard in place, and Ray Data restarts an actor that died.
"""

from __future__ import annotations

import pickle
import time
import warnings
from collections.abc import Iterator, Sequence

import ray

from pipeline.engine.ledger import ShardRecord
from pipeline.engine.tasks import Placement, ShardTask, ShardWorker, make_shard_retrying
from pipeline.errors import StageFailed, one_line

Outcome = tuple[str, ShardRecord | str]

WINDOW_EVERY_S = 10.0
"""Seconds between two sizings of the Ray-task window from the cluster's CPUs."""


def _task(
    worker: ShardWorker, placement: Placement, ledger_root: str, task: ShardTask, fingerprint: str, retries: int
) -> ShardRecord:
    worker.setup(placement)
    return make_shard_retrying(worker, ledger_root, task, fingerprint, retries)


def on_tasks(
    worker: ShardWorker,
    ledger_root: str,
    todo: Sequence[ShardTask],
    fingerprint: str,
    retries: int,
    placement: Placement,
) -> Iterator[Outcome]:
    """One Ray task per shard, at most about two per CPU in flight (the driver holds only those).
    A task retries its shard's errors itself; Ray reruns it when its worker dies."""
    remote = ray.remote(_task).options(num_cpus=placement.cpus, num_gpus=placement.gpus, max_retries=retries)
    worker_ref = ray.put(worker)
    queue = list(reversed(todo))
    pending: dict[ray.ObjectRef, ShardTask] = {}
    window, sized = 0, -WINDOW_EVERY_S
    while queue or pending:
        if time.monotonic() - sized >= WINDOW_EVERY_S:
            # sized again as nodes come and go: an autoscaling cluster starts small, and the tasks
            # queued beyond its CPUs are the demand its autoscaler adds nodes for
            window, sized = max(4, 2 * int(ray.cluster_resources().get("CPU", 1) / placement.cpus)), time.monotonic()
        while queue and len(pending) < window:
            task = queue.pop()
            pending[remote.remote(worker_ref, placement, ledger_root, task, fingerprint, retries)] = task
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            task = pending.pop(ref)
            try:
                yield task.shard, ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a remote failure, summarised for the user
                yield task.shard, one_line(err)


class _PoolActor:
    """A pool actor: sets its worker up once, then makes every shard it is handed."""

    def __init__(self, worker: ShardWorker, placement: Placement, ledger_root: str, fingerprint: str, retries: int):
        worker.setup(placement)
        self.worker, self.ledger_root, self.fingerprint, self.retries = worker, ledger_root, fingerprint, retries

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "record": [], "error": []}
        for shard, blob in zip(batch["shard"], batch["task"]):
            task, record, error = pickle.loads(blob), "", ""
            try:
                made = make_shard_retrying(self.worker, self.ledger_root, task, self.fingerprint, self.retries)
                record = pickle.dumps(made)
            except Exception as err:  # noqa: BLE001 - recorded by the driver
                error = one_line(err)
            out["shard"].append(str(shard))
            out["record"].append(record)
            out["error"].append(error)
        return out


def _pool_size(placement: Placement, shards: int):
    import ray.data

    if placement.actors is not None:
        return ray.data.ActorPoolStrategy(size=min(placement.actors, shards))
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, shards))


def on_pool(
    worker: ShardWorker,
    ledger_root: str,
    todo: Sequence[ShardTask],
    fingerprint: str,
    retries: int,
    placement: Placement,
) -> Iterator[Outcome]:
    """The shards stream through a Ray Data `ActorPoolStrategy` pool of `placement.actors` actors
    (no more than there are shards), or with `actors` None one that Ray Data grows from one actor
    to one per shard while the cluster has room; raises StageFailed when the pool itself cannot
    run (actors that cannot load their models)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"shard": task.shard, "task": pickle.dumps(task)} for task in todo]
    with warnings.catch_warnings():
        # Ray 2.60 deprecates map_batches' extra remote arguments but names no parameter for an
        # actor's restarts, which it still reads only from them (without them its actors retry forever)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _PoolActor,
            fn_constructor_kwargs={
                "worker": worker,
                "placement": placement,
                "ledger_root": ledger_root,
                "fingerprint": fingerprint,
                "retries": retries,
            },
            batch_size=1,
            compute=_pool_size(placement, len(todo)),
            num_gpus=placement.gpus,
            num_cpus=placement.cpus,
            max_restarts=retries,
            max_task_retries=retries,
        )
    try:
        for row in dataset.iter_rows():
            if row["error"]:
                yield row["shard"], row["error"]
            else:
                yield row["shard"], pickle.loads(row["record"])
    except Exception as err:  # noqa: BLE001 - e.g. actors that cannot load their models
        raise StageFailed(one_line(err)) from None
