"""The shape every model stage (dvae, clip, train) shares: one "model" shard that is either trained
with `pipeline.train.trainer.fit` or taken from the recipe's weights, then scored on held-out
samples and committed with its `metrics.json` through the ledger."""

from __future__ import annotations

import time
from typing import Any

from pipeline import storage
from pipeline.stages.base import RunContext, Stage
from pipeline.train.trainer import fit, progress_url

SHARD = "model"


class ModelStage(Stage):
    tracks_itself = True
    """Subclasses implement `build` (weights into the attempt folder) and `score`."""

    task: str
    """The `TrainTask` as "module:Class"."""
    data_stage: str = "filter"
    """The stage whose committed shards the model trains on."""

    def build(self, attempt: str, ctx: RunContext) -> tuple[list[str], int]:
        """Writes the model into `attempt`; returns its files and the samples trained on."""
        raise NotImplementedError

    def score(self, attempt: str) -> tuple[dict[str, float], list[str]]:
        """Held-out scores of the model in `attempt`, and any more files it wrote there."""
        raise NotImplementedError

    def train(self, attempt: str, ctx: RunContext, config: dict[str, Any], holdout: int) -> int:
        """Trains `self.task` with the stage's `train` settings; returns the samples trained on."""
        fit(
            self.name,
            self.task,
            config,
            self.cfg.train,
            data_url=self.upstream_url(self.data_stage),
            holdout=holdout,
            out_url=attempt,
            stage_url=self.url,
            name=f"{self.recipe.name}-{self.name}",
            progress=ctx.progress,
        )
        return self.cfg.train.samples_seen

    def status(self) -> dict[str, Any]:
        """The stage's status, with its training step while it trains."""
        status = super().status()
        progress = storage.read_json_or_none(progress_url(self.url))
        if status["state"] != "complete" and progress is not None:
            status["training"] = f"step {progress['step']}/{progress['steps']}"
        return status

    def run(self, ctx: RunContext) -> dict[str, Any]:
        self.write_plan(1)
        if SHARD not in self.ledger.done():
            started = time.monotonic()
            attempt = self.ledger.attempt_dir(SHARD)
            files, trained = self.build(attempt, ctx)
            scores, extra = self.score(attempt)
            storage.write_json(storage.join(attempt, "metrics.json"), scores)
            self.ledger.commit_files(
                SHARD,
                attempt,
                [*files, *extra, "metrics.json"],
                samples_in=trained,
                samples_out=1,
                fingerprint=ctx.fingerprint.digest,
                started=started,
            )
        scores = storage.read_json(storage.join(self.url, "metrics.json"))
        return {"shards": 1, "samples_in": self.ledger.done()[SHARD].samples_in, "samples_out": 1, **scores}
