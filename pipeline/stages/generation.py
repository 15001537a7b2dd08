"""What the generation stages (sample, evaluate) share: the trained models loaded once per pool
actor, one shard per prompt, and the shard's files written and committed through the ledger."""

from __future__ import annotations

from typing import Any

import torch

from pipeline import storage
from pipeline.actor_pool import pool_shape, run_on_pool
from pipeline.config_generation import GenerationConfig
from pipeline.ledger import Ledger, ShardRecord
from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.stages.base import InputError, RunContext, Stage
from pipeline.stages.train import MODEL_FILES, companions


def load_generator(spec: dict[str, Any]) -> ImageGenerator:
    """The models of one pool actor (spec: model URL, GPUs and CPUs per actor, precision)."""
    on_gpu = spec["gpus"] > 0 and torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(max(1, int(spec["cpus"])))
    paths = {k: spec[k] for k in ("dvae", "clip", "tokenizer")}
    return ImageGenerator.load(spec["model"], device="cuda" if on_gpu else "cpu", precision=spec["precision"], **paths)


def sampling(payload: dict[str, Any]) -> SamplingConfig:
    keys = ("temperature", "top_k", "top_p", "batch_size", "seed")
    return SamplingConfig(**{k: payload[k] for k in keys})


def commit_shard(payload: dict[str, Any], files: dict[str, bytes], started: float, **counts: int) -> ShardRecord:
    """Writes `files` (name -> bytes) to a fresh attempt folder and commits them as the payload's shard."""
    ledger = Ledger(payload["stage_url"])
    shard = payload["shard"]
    attempt = ledger.attempt_dir(shard)
    for name, data in files.items():
        storage.write_atomic(storage.join(attempt, name), data)
    return ledger.commit_files(
        shard,
        attempt,
        list(files),
        samples_in=payload["candidates"],
        samples_out=payload["top"],
        fingerprint=payload["fingerprint"],
        started=started,
        counts=counts,
    )


def shard_records(url: str) -> list[tuple[str, dict]]:
    """(shard, its `<shard>.json`) for every committed prompt shard of the stage at `url`, in shard order."""
    return [(shard, storage.read_json(storage.join(url, f"{shard}.json"))) for shard in sorted(Ledger(url).done())]


class GenerationStage(Stage):
    """A stage that draws reranked candidates per prompt with the trained transformer."""

    upstream = ("train",)
    shard_fn: str
    """The per-prompt shard function, "module:function"."""

    def model_url(self) -> str:
        url = self.upstream_url("train")
        missing = [f for f in MODEL_FILES if not storage.exists(storage.join(url, f))]
        if missing:
            raise InputError(f"{url}: no trained transformer ({', '.join(missing)} missing); run the train stage first")
        return url

    def run_prompts(self, ctx: RunContext, prompts: list[tuple[str, dict[str, Any]]]) -> None:
        """Runs the (shard, payload) prompts the ledger does not hold yet on the actor pool."""
        cfg: GenerationConfig = self.cfg
        done = self.ledger.done()
        self.write_plan(len(prompts))
        todo = [(shard, payload) for shard, payload in prompts if shard not in done]
        ctx.progress.start(self.name, total=len(prompts), done=len(prompts) - len(todo))
        shape = pool_shape(cfg.actors, cfg.gpus_per_actor, self.recipe.ray.cpus_per_task)
        keys = ("candidates", "top", "temperature", "top_k", "top_p", "batch_size", "seed")
        spec = {
            "load": "pipeline.stages.generation:load_generator",
            "fn": self.shard_fn,
            "models": {
                "model": self.model_url(),
                **companions(self.recipe, self.output_dir),
                "gpus": shape[1],
                "cpus": shape[2],
                "precision": cfg.precision,
            },
            "common": {
                "stage_url": self.url,
                "fingerprint": ctx.fingerprint.digest,
                **{k: getattr(cfg, k) for k in keys},
            },
        }
        run_on_pool(self.ledger, todo, spec, label=self.name, progress=ctx.progress, shape=shape)
