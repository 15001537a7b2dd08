"""encode: every filtered shard → an encoded shard of image tokens (dVAE argmax), text tokens,
CLIP image and text embeddings and their cosine similarity, with the LAION-style threshold.

The shards go through an actor pool; each actor loads the dVAE, CLIP and the tokenizer once
(`setup`, on the GPUs `encode.gpus_per_actor` gives it, else on CPUs) and encodes whole shards
(`encode_shard`), which the engine commits, so the ledger, resume and per-shard failure records
work as in every stage.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.resources import GpuAsk, pool_ask
from pipeline.engine.tasks import Placement, pool_placement
from pipeline.errors import InputError
from pipeline.stages.base import RunContext, Stage, torch_device
from pipeline.stages.clip import clip_path
from pipeline.stages.encode_task import DROP_REASON, EncodeTask

log = logging.getLogger(__name__)

MAX_TOKEN = np.iinfo(np.uint16).max + 1


class EncodeStage(Stage):
    name = "encode"
    config_key = "encode"
    upstream = ("filter", "text-tokenizer", "dvae", "clip")

    def tasks(self) -> list[EncodeTask]:
        """Every filtered shard, from filter's ledger."""
        filter_url = self.upstream_url("filter")
        tasks = []
        for shard, record in sorted(Ledger(filter_url).done().items()):
            tar, manifest = (storage.join(filter_url, f) for f in record.files)
            tasks.append(EncodeTask(shard, url=tar, manifest=manifest, count=record.samples_out))
        return tasks

    def _tokenizer_url(self) -> str:
        return storage.join(self.upstream_url("text-tokenizer"), "tokenizer.json")

    def _dvae_url(self) -> str:
        return storage.join(self.upstream_url("dvae"), "dvae.pt")

    def setup(self, placement: Placement) -> None:
        from pipeline.stages.encode_shard import Encoders  # torch and the models: the workers' side

        self._models = Encoders.load(
            dvae=self._dvae_url(),
            clip=clip_path(self.recipe, self.output_dir),
            tokenizer=self._tokenizer_url(),
            text_len=self.recipe.text_tokenizer.text_len,
            batch_size=self.cfg.batch_size,
            precision=self.cfg.precision,
            device=torch_device(placement),
        )

    def process(self, task: EncodeTask, attempt: Attempt) -> ShardResult:
        from pipeline.stages.encode_shard import encode_shard

        return encode_shard(self._models, task, attempt, self.cfg.clip_threshold)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pipeline.models.bpe import TextTokenizer
        from pipeline.models.dvae import load_dvae

        text_len = self.recipe.text_tokenizer.text_len
        vocab = TextTokenizer.load(self._tokenizer_url(), text_len).vocab_size
        dvae = load_dvae(self._dvae_url())
        if max(vocab, dvae.vocab_size) > MAX_TOKEN:
            raise InputError(f"encode: token ids are stored as uint16; vocabularies above {MAX_TOKEN} do not fit")
        tasks = self.tasks()
        self.write_plan(
            len(tasks),
            image_tokens=dvae.grid**2,
            image_vocab=dvae.vocab_size,
            text_len=text_len,
            text_vocab=vocab,
            embed_dim=self.embed_dim(),
        )
        records = self.run_shards(ctx, tasks, retries=self.cfg.max_task_retries, placement=self.placement()).values()
        return {
            "shards": len(tasks),
            "samples_in": sum(r.samples_in for r in records),
            "samples_out": sum(r.samples_out for r in records),
            "counts": {DROP_REASON: sum(r.counts.get(DROP_REASON, 0) for r in records)},
        }

    def placement(self) -> Placement:
        """The recipe's pool: `encode.actors` actors (null: autoscaling) of `encode.gpus_per_actor` GPUs."""
        return pool_placement(self.config_key, self.cfg.actors, self.cfg.gpus_per_actor, self.recipe.ray.cpus_per_task)

    def gpu_ask(self) -> GpuAsk | None:
        return pool_ask(self.config_key, self.recipe.ray.cpus_per_task, self.cfg.gpus_per_actor)

    def embed_dim(self) -> int:
        from transformers import CLIPConfig

        # read through fsspec: `from_pretrained` takes local folders and Hub ids, not s3:// URLs
        config = storage.read_json(storage.join(clip_path(self.recipe, self.output_dir), "config.json"))
        return CLIPConfig.from_dict(config).projection_dim
