"""What a stage hands the executor: typed shard tasks, the worker that makes their shards, and
where they run."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.ledger import Attempt, Ledger, ShardRecord, ShardResult


@dataclass(frozen=True)
class ShardTask:
    """One unit of a stage's work; subclasses add the typed fields their worker reads."""

    shard: str
    """Shard id, unique within the ledger it commits to."""


@dataclass(frozen=True)
class Placement:
    """Where shard tasks run: Ray tasks asking `cpus` (and `gpus`) each, or with `actors` a pool of
    that many actors holding `cpus` CPUs and `gpus` GPUs each."""

    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None


PLACEMENT = Placement()
"""Ray tasks of one CPU each."""


class ShardWorker:
    """What makes a stage's shards, sent (pickled) to a Ray worker or a pool actor."""

    def setup(self, placement: Placement) -> None:
        """Loads what every shard needs (models) for the resources `placement` gave this process,
        once per process before its first shard."""

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        """Writes one shard's files into `attempt`; the engine commits them."""
        raise NotImplementedError


def pool_placement(actors: int | None, gpus_per_actor: float | None, cpus: float) -> Placement:
    """A pool on this cluster: one actor per GPU when it has GPUs, else one per `cpus` CPUs,
    unless the recipe gives `actors` or `gpus_per_actor`."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    per_gpu = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if actors is None:
        actors = max(1, int(gpus / per_gpu)) if per_gpu > 0 else max(1, int(resources.get("CPU", 1) / cpus))
    return Placement(cpus=cpus, gpus=per_gpu, actors=actors)


def make_shard(worker: ShardWorker, ledger_root: str, task: ShardTask, fingerprint: str) -> ShardRecord:
    """One try at a shard: the worker writes it into a fresh attempt, which then commits it."""
    attempt = Attempt(Ledger(ledger_root), task.shard, fingerprint)
    return attempt.commit(worker.process(task, attempt))


def make_shard_retrying(
    worker: ShardWorker, ledger_root: str, task: ShardTask, fingerprint: str, retries: int
) -> ShardRecord:
    """Up to 1 + `retries` tries at a shard in this process; the last try's error is raised.
    Retrying here, not through Ray's `retry_exceptions`, keeps Ray from printing a traceback to
    the user's terminal for every retried try (the executor reports the failures, one line each)."""
    for _ in range(retries):
        try:
            return make_shard(worker, ledger_root, task, fingerprint)
        except Exception:  # noqa: BLE001 - tried again below; the last try's error is the one raised
            continue
    return make_shard(worker, ledger_root, task, fingerprint)
