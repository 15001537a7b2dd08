"""The shape every model stage (dvae, clip, train) shares: one "model" shard that is either trained
with `pipeline.train.trainer.fit` or taken from the recipe's weights, then scored on held-out
samples and committed with its `metrics.json` as one `Attempt`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline import storage
from pipeline.engine.ledger import Attempt, ShardResult
from pipeline.engine.resources import GpuAsk, await_gpus, note_unused_gpus, train_ask
from pipeline.stages.base import RunContext, Stage, StageStatus, TrainingProgress
from pipeline.train.paths import progress_url

SHARD = "model"


class ModelStage(Stage):
    tracks_itself = True
    """Subclasses implement `build` (weights into the attempt folder) and `score`."""

    task: str
    """The `TrainTask` as "module:Class"."""
    data_stage: str = "filter"
    """The stage whose committed shards the model trains on."""

    def build(self, attempt: Attempt, ctx: RunContext) -> int:
        """Writes the model into `attempt` (its files named there); returns the samples trained on."""
        raise NotImplementedError

    def score(self, attempt: Attempt) -> dict[str, float]:
        """Held-out scores of the model in `attempt` (any more files it writes go there too)."""
        raise NotImplementedError

    def train(self, folder: str, ctx: RunContext, config: dict[str, Any], holdout: int) -> int:
        """Trains `self.task` with the stage's `train` settings; returns the samples trained on.
        A GPU run first makes sure the cluster can give every worker its GPU (or stops in one line)."""
        from pipeline.train.trainer import fit  # torch, DeepSpeed, Ray Train: only where a stage trains

        ask = self.gpu_ask()
        if ask is not None:
            await_gpus(self.name, ask, self.recipe.ray.gpu_wait_s)
        else:
            note_unused_gpus(self.name, f"{self.config_key}.train.use_gpu")
        return fit(
            self.name,
            self.task,
            config,
            self.cfg.train,
            data_url=self.upstream_url(self.data_stage),
            holdout=holdout,
            out_url=folder,
            stage_url=self.url,
            name=f"{self.recipe.name}-{self.name}",
            progress=ctx.progress,
        )

    def gpu_ask(self) -> GpuAsk | None:
        """Every worker's GPU when the stage trains with `use_gpu` (given weights train nothing)."""
        if getattr(self.cfg, "weights", None) is not None:
            return None
        train = self.cfg.train
        return train_ask(self.config_key, train.workers, train.cpus_per_worker, train.use_gpu)

    def status(self) -> StageStatus:
        """The stage's status, with its training run's step (once it trained)."""
        status = super().status()
        progress = None if status.state == "pending" else storage.read_json_or_none(progress_url(self.url))
        if progress is None:
            return status
        training = TrainingProgress(progress["step"], progress.get("steps"), progress.get("samples_per_s"))
        return replace(status, training=training)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        self.write_plan(1)
        if SHARD not in self.ledger.done():
            attempt = Attempt(self.ledger, SHARD, ctx.fingerprint.digest)
            trained = self.build(attempt, ctx)
            scores = self.score(attempt)
            storage.write_json(attempt.path("metrics.json"), scores)
            attempt.commit(ShardResult(samples_in=trained, samples_out=1))
        scores = storage.read_json(storage.join(self.url, "metrics.json"))
        return {"shards": 1, "samples_in": self.ledger.done()[SHARD].samples_in, "samples_out": 1, **scores}
