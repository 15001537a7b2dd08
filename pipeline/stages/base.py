"""The stage contract: what a stage reads and writes, its fingerprint, its run, its status.

A stage's logic lives in plain functions (unit-tested without Ray); the stage class only plans
shard tasks, hands them to `pipeline.executor.run_tasks`, and summarises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline import storage
from pipeline.config import Recipe
from pipeline.executor import ShardTask, run_tasks
from pipeline.ledger import Fingerprint, Ledger, ShardRecord
from pipeline.progress import StageProgress


class InputError(ValueError):
    """A user input (URL list, upstream output) that cannot be used; one line for the user."""


@dataclass
class RunContext:
    """Runtime objects a stage gets from the workflow (never stored in configs)."""

    progress: StageProgress
    fingerprint: Fingerprint


class Stage:
    """Base of every stage. Subclasses set the class variables and implement `run`."""

    name: ClassVar[str]
    """Folder and display name (`text-tokenizer`)."""
    config_key: ClassVar[str]
    """Recipe section (`text_tokenizer`)."""
    upstream: ClassVar[tuple[str, ...]] = ()
    """Stages whose output this one reads."""
    tracks_itself: ClassVar[bool] = False
    """Its own code logs to W&B (training, evaluation); else the driver logs its shards."""

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
        tasks: list[ShardTask],
        fn: Callable[[Any], ShardRecord],
        ledger: Ledger | None = None,
        label: str | None = None,
        max_retries: int = 2,
    ) -> dict[str, ShardRecord]:
        """Runs shard tasks on Ray (each asking for the recipe's `ray.cpus_per_task`), skipping
        those in `ledger` (the stage's own by default)."""
        return run_tasks(
            ledger or self.ledger,
            tasks,
            fn,
            label=label or self.name,
            progress=ctx.progress,
            num_cpus=self.recipe.ray.cpus_per_task,
            max_retries=max_retries,
        )

    def inspect_inputs(self) -> dict[str, Any]:
        """Checks external inputs without writing anything; returns their identity (for the
        fingerprint). Raises InputError for unusable inputs."""
        return {}

    def fingerprint(self, upstream: dict[str, str], inputs: dict[str, Any]) -> Fingerprint:
        return Fingerprint(
            stage=self.name,
            config=self.cfg.fingerprinted(),
            inputs={"upstream": upstream, **inputs},
        )

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Does the work (skipping what the ledger holds); returns the stage's stats."""
        raise NotImplementedError

    # -- bookkeeping shared by all stages -------------------------------------------------------
    def write_plan(self, shards: int, **extra: Any) -> None:
        storage.write_json(storage.join(self.url, "_plan.json"), {"shards": shards, **extra})

    def write_done(self, stats: dict[str, Any], seconds: float) -> None:
        storage.write_json(
            storage.join(self.url, "_done.json"), {**stats, "seconds": round(seconds, 3), "finished_at": time.time()}
        )

    def is_done(self) -> bool:
        return storage.exists(storage.join(self.url, "_done.json"))

    def status(self) -> dict[str, Any]:
        """State, shard and sample counts, per-reason counts, failures, last update (from the ledger)."""
        plan = storage.read_json_or_none(storage.join(self.url, "_plan.json"))
        done = storage.read_json_or_none(storage.join(self.url, "_done.json"))
        records = self.ledger.done()
        failures = self.ledger.failures()
        counts: dict[str, int] = {}
        for rec in records.values():
            for reason, n in rec.counts.items():
                counts[reason] = counts.get(reason, 0) + n
        if done is not None:
            state = "complete"
        elif failures:
            state = "failed"
        elif plan is not None or records:
            state = "partial"
        else:
            state = "pending"
        stats = done or {}
        return {
            "stage": self.name,
            "state": state,
            "output": self.url,
            "shards_done": len(records),
            "shards_total": plan["shards"] if plan else None,
            "samples_in": stats.get("samples_in", sum(r.samples_in for r in records.values())),
            "samples_out": stats.get("samples_out", sum(r.samples_out for r in records.values())),
            "counts": stats.get("counts", counts),
            "failures": len(failures),
            "failure_examples": [f"{k}: {v['error']}" for k, v in sorted(failures.items())[:3]],
            "seconds": stats.get("seconds"),
            "last_update": max([r.finished_at for r in records.values()] + [stats.get("finished_at", 0)], default=None)
            or None,
        }
