"""encode: every filtered shard → an encoded shard of image tokens (dVAE argmax), text tokens,
CLIP image and text embeddings and their cosine similarity, with the LAION-style threshold.

The pending shards go through an actor pool (`pipeline.actor_pool`); each actor loads the dVAE,
CLIP and the tokenizer once (on a GPU when the cluster has them) and encodes, writes and commits
whole shards, so the ledger, resume and per-shard failure records work as in every other stage.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.actor_pool import pool_shape, run_on_pool
from pipeline.ledger import Ledger
from pipeline.stages.base import InputError, RunContext, Stage
from pipeline.stages.clip import clip_path
from pipeline.stages.encode_shard import DROP_REASON

log = logging.getLogger(__name__)

MAX_TOKEN = np.iinfo(np.uint16).max + 1


class EncodeStage(Stage):
    name = "encode"
    config_key = "encode"
    upstream = ("filter", "text-tokenizer", "dvae", "clip")

    def pending(self) -> list[tuple[str, dict[str, Any]]]:
        """The filtered shards not yet encoded, from filter's ledger."""
        filter_url = self.upstream_url("filter")
        done = self.ledger.done()
        rows = []
        for shard, record in sorted(Ledger(filter_url).done().items()):
            if shard in done:
                continue
            tar, manifest = (storage.join(filter_url, f) for f in record.files)
            rows.append((shard, {"url": tar, "manifest": manifest, "count": record.samples_out}))
        return rows

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from pipeline.models.dvae import load_dvae
        from pipeline.text_tokenizer import TextTokenizer

        tokenizer = storage.join(self.upstream_url("text-tokenizer"), "tokenizer.json")
        text_len = self.recipe.text_tokenizer.text_len
        vocab = TextTokenizer.load(tokenizer, text_len).vocab_size
        dvae_url = storage.join(self.upstream_url("dvae"), "dvae.pt")
        dvae = load_dvae(dvae_url)
        if max(vocab, dvae.vocab_size) > MAX_TOKEN:
            raise InputError(f"encode: token ids are stored as uint16; vocabularies above {MAX_TOKEN} do not fit")
        total = len(Ledger(self.upstream_url("filter")).done())
        self.write_plan(
            total,
            image_tokens=dvae.grid**2,
            image_vocab=dvae.vocab_size,
            text_len=text_len,
            text_vocab=vocab,
            embed_dim=self.embed_dim(),
        )
        todo = self.pending()
        ctx.progress.start(self.name, total=total, done=total - len(todo))
        self.encode(ctx, todo, dvae_url, tokenizer, text_len)
        records = self.ledger.done().values()
        return {
            "shards": total,
            "samples_in": sum(r.samples_in for r in records),
            "samples_out": sum(r.samples_out for r in records),
            "counts": {DROP_REASON: sum(r.counts.get(DROP_REASON, 0) for r in records)},
        }

    def embed_dim(self) -> int:
        from transformers import CLIPConfig

        # read through fsspec: `from_pretrained` takes local folders and Hub ids, not s3:// URLs
        config = storage.read_json(storage.join(clip_path(self.recipe, self.output_dir), "config.json"))
        return CLIPConfig.from_dict(config).projection_dim

    def encode(self, ctx: RunContext, todo: list, dvae_url: str, tokenizer: str, text_len: int) -> None:
        shape = pool_shape(self.cfg.actors, self.cfg.gpus_per_actor, self.recipe.ray.cpus_per_task)
        spec = {
            "load": "pipeline.stages.encode_shard:Encoders.load",
            "fn": "pipeline.stages.encode_shard:encode_shard",
            "models": {
                "dvae": dvae_url,
                "clip": clip_path(self.recipe, self.output_dir),
                "tokenizer": tokenizer,
                "text_len": text_len,
                "batch_size": self.cfg.batch_size,
                "precision": self.cfg.precision,
                "gpus": shape[1],
                "cpus": shape[2],
            },
            "common": {
                "stage_url": self.url,
                "threshold": self.cfg.clip_threshold,
                "fingerprint": ctx.fingerprint.digest,
            },
        }
        run_on_pool(
            self.ledger,
            todo,
            spec,
            label=self.name,
            progress=ctx.progress,
            shape=shape,
            max_retries=self.cfg.max_task_retries,
        )
