"""The stage contract: what a stage reads and writes, its fingerprint, its run, its status.

A stage's logic lives in plain functions (unit-tested without Ray). The stage class plans typed
shard tasks and hands them, with itself as the worker, to `pipeline.engine.executor.run_shards`:
in the Ray worker or pool actor its `setup()` loads what every shard needs (models) once, and
`process(task, attempt)` writes one shard into the attempt the engine then commits.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from pipeline import storage
from pipeline.config.recipe import Recipe
from pipeline.engine.executor import run_shards
from pipeline.engine.ledger import Fingerprint, Ledger, ShardRecord
from pipeline.engine.resources import GpuAsk
from pipeline.engine.tasks import Placement, ShardTask, ShardWorker
from pipeline.errors import ClusterError, StageFailed
from pipeline.observe.progress import StageProgress

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Runtime objects a stage gets from the workflow (never stored in configs)."""

    progress: StageProgress
    fingerprint: Fingerprint


def torch_device(placement: Placement) -> str:
    """ "cuda" for a process the placement gave GPUs, else "cpu" with torch's threads limited to
    the placement's CPUs. Raises ClusterError when Ray gave this process GPUs that torch cannot
    see (a CPU build of torch on a GPU node): a GPU recipe never runs on CPUs unsaid."""
    import torch

    if placement.gpus > 0:
        if not torch.cuda.is_available():
            raise ClusterError(
                f"Ray gave this process {placement.gpus:g} GPUs, but torch {torch.__version__} sees none "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install a CUDA build of "
                "torch on the GPU nodes"
            )
        return "cuda"
    torch.set_num_threads(max(1, int(placement.cpus)))
    return "cpu"


@dataclass(frozen=True)
class TrainingProgress:
    """Where a trained stage's run stands (from `_train/progress.json`)."""

    step: int
    steps: int | None
    samples_per_s: float | None = None


@dataclass(frozen=True)
class StageStatus:
    """One stage's state, read from its folder alone (`dalle status`, the dashboard, the report)."""

    stage: str
    state: Literal["complete", "failed", "partial", "pending"]
    output: str
    shards_done: int
    shards_total: int | None
    samples_in: int
    samples_out: int
    counts: dict[str, int]
    """Drops and failures by reason."""
    failures: int
    """Shards that gave up and are not committed since."""
    failure_examples: list[str]
    """"shard: error" of the first few failed shards."""
    seconds: float | None
    last_update: float | None
    """Unix time of the newest commit (or of the stage's completion)."""
    training: TrainingProgress | None = None
    """The training run's step, while a model stage trains."""
    scanned_shards: int | None = None
    """Raw shards the filter's scan phase has read, while the filter runs."""
    warning: str | None = None
    """The line saying the stage's failed rows passed the recipe's share (`FailedShare`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FailedShare:
    """The rows a stage lost to failures (downloads that did not happen, not a rule's drops)
    against its section's `warn_failed_share` and `max_failed_share` (None: no threshold)."""

    stage: str
    section: str
    rows: int
    failed: dict[str, int]
    """Failed rows by reason."""
    warn: float | None
    limit: float | None

    @property
    def share(self) -> float:
        return sum(self.failed.values()) / self.rows if self.rows else 0.0

    @property
    def fails(self) -> bool:
        return self.limit is not None and self.share > self.limit

    @property
    def warns(self) -> bool:
        return self.fails or (self.warn is not None and self.share > self.warn)

    def describe(self) -> str:
        """The share, the top reasons and the highest threshold passed, e.g. `62.5% of 80 rows
        failed (connection_error 48, http_4xx 2), above ingest.warn_failed_share 0.3`."""
        top = sorted(((r, n) for r, n in self.failed.items() if n), key=lambda rn: (-rn[1], rn[0]))
        reasons = ", ".join(f"{r} {n}" for r, n in top[:3]) + (", ..." if len(top) > 3 else "")
        field, value = ("max_failed_share", self.limit) if self.fails else ("warn_failed_share", self.warn)
        above = "" if value is None else f", above {self.section}.{field} {value:g}"
        return f"{self.share:.1%} of {self.rows} rows failed ({reasons or 'none'}){above}"


class Stage(ShardWorker):
    """Base of every stage. Subclasses set the class variables and implement `run` (and, for
    the shards they hand the engine, `setup` and `process`)."""

    name: ClassVar[str]
    """Folder and display name (`text-tokenizer`)."""
    config_key: ClassVar[str]
    """Recipe section (`text_tokenizer`)."""
    upstream: ClassVar[tuple[str, ...]] = ()
    """Stages whose output this one reads."""
    tracks_itself: ClassVar[bool] = False
    """Its own code logs to W&B (training, evaluation); else the driver logs its shards."""
    always_tracked: ClassVar[bool] = False
    """The driver logs its shards to W&B even without a project (offline, under the stage folder,
    as the training stages do): for stages whose output is looked at (the sample grids)."""
    failure_reasons: ClassVar[tuple[str, ...]] = ()
    """Counted reasons that are failures (rows the stage meant to keep and could not fetch), not
    a rule's drops; a stage that has some has `warn_failed_share` and `max_failed_share` in its
    section (`check_failed_share`)."""

    def __init__(self, recipe: Recipe, output_dir: str):
        self.recipe = recipe
        self.cfg = getattr(recipe, self.config_key)
        self.output_dir = output_dir
        self.url = storage.join(output_dir, self.name)
        self.ledger = Ledger(self.url)

    @property
    def wandb_project(self) -> str | None:
        """W&B project of the driver-logged run of this stage; None: no run."""
        return self.recipe.wandb_project

    def upstream_url(self, name: str) -> str:
        return storage.join(self.output_dir, name)

    def run_shards(
        self,
        ctx: RunContext,
        tasks: Sequence[ShardTask],
        *,
        ledger: Ledger | None = None,
        label: str | None = None,
        retries: int = 2,
        placement: Placement | None = None,
    ) -> dict[str, ShardRecord]:
        """Has this stage make the shards of `tasks` that `ledger` (its own by default) does not
        hold: as Ray tasks asking the recipe's `ray.cpus_per_task` each, or on `placement`."""
        return run_shards(
            ledger or self.ledger,
            tasks,
            self,
            fingerprint=ctx.fingerprint.digest,
            label=label or self.name,
            progress=ctx.progress,
            retries=retries,
            placement=placement or Placement(cpus=self.recipe.ray.cpus_per_task),
            gpu_wait_s=self.recipe.ray.gpu_wait_s,
        )

    def gpu_ask(self) -> GpuAsk | None:
        """The GPUs this stage's run asks Ray for, from the recipe alone; None: it runs on CPUs."""
        return None

    def inspect_inputs(self) -> dict[str, Any]:
        """Checks external inputs without writing anything; returns their identity (for the
        fingerprint). Raises InputError for unusable inputs."""
        return {}

    def fingerprint(self, upstream: dict[str, str], inputs: dict[str, Any]) -> Fingerprint:
        return Fingerprint(
            stage=self.name,
            config=self.cfg.fingerprinted(),
            inputs={"upstream": upstream, **inputs},
            added=self.cfg.added_paths(),
            dropped=frozenset(self.cfg.execution_paths()),
        )

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Does the work (skipping what the ledger holds); returns the stage's stats."""
        raise NotImplementedError

    def failed_share(self, samples_in: int, counts: dict[str, int]) -> FailedShare | None:
        """The stage's failed rows against its recipe's thresholds (None: it counts no failures)."""
        if not self.failure_reasons:
            return None
        failed = {reason: counts.get(reason, 0) for reason in self.failure_reasons}
        return FailedShare(
            self.name, self.config_key, samples_in, failed, self.cfg.warn_failed_share, self.cfg.max_failed_share
        )

    def check_failed_share(self, stats: dict[str, Any]) -> None:
        """After `run`: one warning line when the failed rows pass the recipe's warning share;
        StageFailed when they pass its limit. The committed shards stay, so a rerun with a higher
        limit only finishes the stage."""
        share = self.failed_share(stats.get("samples_in", 0), stats.get("counts", {}))
        if share is None or not share.warns:
            return
        if share.fails:
            raise StageFailed(
                f"stage '{self.name}': {share.describe()}; its {stats.get('shards', 0)} shards stay committed: "
                f"fix the cause and rerun, or raise {self.config_key}.max_failed_share (null: never fail) "
                "and rerun to finish without fetching them again"
            )
        log.warning("%s: %s", self.name, share.describe())

    # -- bookkeeping shared by all stages -------------------------------------------------------
    def write_plan(self, shards: int, **extra: Any) -> None:
        storage.write_json(storage.join(self.url, "_plan.json"), {"shards": shards, **extra})

    def write_done(self, stats: dict[str, Any], seconds: float) -> None:
        storage.write_json(
            storage.join(self.url, "_done.json"), {**stats, "seconds": round(seconds, 3), "finished_at": time.time()}
        )

    def is_done(self) -> bool:
        return storage.exists(storage.join(self.url, "_done.json"))

    def done_stats(self) -> dict[str, Any]:
        """What `write_done` recorded for the finished stage (its counts, seconds, end time)."""
        return storage.read_json(storage.join(self.url, "_done.json"))

    def status(self) -> StageStatus:
        """State, shard and sample counts, per-reason counts, failures, last update (from the ledger).
        A stage that never started (no `_fingerprint.json`) costs one request; a compacted one a few."""
        if storage.read_json_or_none(self.ledger.path("_fingerprint.json")) is None:
            return StageStatus(self.name, "pending", self.url, 0, None, 0, 0, {}, 0, [], None, None)
        plan = storage.read_json_or_none(storage.join(self.url, "_plan.json"))
        done = storage.read_json_or_none(storage.join(self.url, "_done.json"))
        records = self.ledger.done()
        failures = self.ledger.failures()
        counts: dict[str, int] = {}
        for rec in records.values():
            for reason, n in rec.counts.items():
                counts[reason] = counts.get(reason, 0) + n
        stats = done or {}
        samples_in = stats.get("samples_in", sum(r.samples_in for r in records.values()))
        share = self.failed_share(samples_in, stats.get("counts", counts))
        if done is not None:
            state = "complete"
        elif failures or (share is not None and share.fails and plan is not None and len(records) >= plan["shards"]):
            state = "failed"  # shards that gave up, or all done and too many rows failed (`check_failed_share`)
        elif plan is not None or records:
            state = "partial"
        else:
            state = "pending"
        last = max([r.finished_at for r in records.values()] + [stats.get("finished_at", 0)], default=None)
        return StageStatus(
            stage=self.name,
            state=state,
            output=self.url,
            shards_done=len(records),
            shards_total=plan["shards"] if plan else None,
            samples_in=samples_in,
            samples_out=stats.get("samples_out", sum(r.samples_out for r in records.values())),
            counts=stats.get("counts", counts),
            failures=len(failures),
            failure_examples=[f"{k}: {v['error']}" for k, v in sorted(failures.items())[:3]],
            seconds=stats.get("seconds"),
            last_update=last or None,
            warning=f"{self.name}: {share.describe()}" if share is not None and share.warns else None,
        )
