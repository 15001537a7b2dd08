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
    """Where shard tasks run: Ray tasks asking `cpus` (and `gpus`) each, or with `pool` a pool of
    actors holding `cpus` CPUs and `gpus` GPUs each: `actors` of them, or with `actors` None a pool
    Ray Data grows from one actor to one per shard while the cluster has room. Every field comes
    from the recipe, never from the cluster of the moment (see `pipeline.engine.resources`)."""

    cpus: float = 1.0
    gpus: float = 0.0
    actors: int | None = None
    pool: bool = False
    section: str = ""
    """The recipe section it comes from (`encode`), named in messages."""

    def __post_init__(self) -> None:
        if self.actors is not None and not self.pool:
            raise ValueError("a Placement with actors is a pool: give pool=True")


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


def pool_placement(section: str, actors: int | None, gpus_per_actor: float | None, cpus: float) -> Placement:
    """The actor pool the recipe's `section` asks for: `actors` actors (None: an autoscaling pool)
    of `cpus` CPUs and `gpus_per_actor` GPUs each (0 or None: on CPUs). A pure function of the
    recipe: an autoscaling cluster has no GPU node when a stage starts, so what it has then decides
    nothing."""
    return Placement(cpus=cpus, gpus=gpus_per_actor or 0.0, actors=actors, pool=True, section=section)


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
