"""encode: every filtered shard → an encoded shard of image tokens (dVAE argmax), text tokens,
CLIP image and text embeddings and their cosine similarity, with the LAION-style threshold.

Ray Data streams the pending shards through an actor pool; each actor loads the dVAE, CLIP and
the tokenizer once (on a GPU when the cluster has them) and encodes, writes and commits whole
shards, so the ledger, resume and per-shard failure records work as in every other stage.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import ray

from pipeline import storage
from pipeline.executor import StageFailed
from pipeline.ledger import Ledger
from pipeline.stages.base import InputError, RunContext, Stage
from pipeline.stages.clip import clip_path
from pipeline.stages.encode_shard import DROP_REASON, Encoders, encode_shard

log = logging.getLogger(__name__)

MAX_TOKEN = np.iinfo(np.uint16).max + 1


class ShardEncoder:
    """A Ray Data actor: holds the models, encodes and commits the shards it is given."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.models = Encoders.load(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "samples_out": [], "error": []}
        for shard, url, manifest, count in zip(batch["shard"], batch["url"], batch["manifest"], batch["count"]):
            payload = {**self.spec["common"], "shard": shard, "url": url, "manifest": manifest, "count": int(count)}
            try:
                record = encode_shard(self.models, payload)
                out["samples_out"].append(record.samples_out)
                out["error"].append("")
            except Exception as err:  # noqa: BLE001 - recorded per shard; the stage reports them
                message = f"{type(err).__name__}: {err}".splitlines()[0]
                Ledger(self.spec["common"]["stage_url"]).record_failure(shard, message)
                out["samples_out"].append(0)
                out["error"].append(message)
            out["shard"].append(shard)
        return out


class EncodeStage(Stage):
    name = "encode"
    config_key = "encode"
    upstream = ("filter", "text-tokenizer", "dvae", "clip")

    def pool(self) -> tuple[int, float, float]:
        """(actors, GPUs per actor, CPUs per actor) for this cluster."""
        gpus = ray.cluster_resources().get("GPU", 0)
        per_gpu = self.cfg.gpus_per_actor if self.cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
        cpus = self.recipe.ray.cpus_per_task
        if self.cfg.actors is not None:
            return self.cfg.actors, per_gpu, cpus
        if per_gpu > 0:
            return max(1, int(gpus / per_gpu)), per_gpu, cpus
        return max(1, int(ray.cluster_resources().get("CPU", 1) / cpus)), 0.0, cpus

    def pending(self) -> list[dict[str, Any]]:
        """The filtered shards not yet encoded, from filter's ledger."""
        filter_url = self.upstream_url("filter")
        done = self.ledger.done()
        rows = []
        for shard, record in sorted(Ledger(filter_url).done().items()):
            if shard in done:
                continue
            tar, manifest = (storage.join(filter_url, f) for f in record.files)
            rows.append({"shard": shard, "url": tar, "manifest": manifest, "count": record.samples_out})
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
        if todo:
            self.encode(ctx, todo, dvae_url, tokenizer, text_len)
        failures = self.ledger.failures()
        if failures:
            shard, info = sorted(failures.items())[0]
            raise StageFailed(
                f"stage '{self.name}': {len(failures)} of {total} shards failed "
                f"(first: shard {shard}: {info['error']}); rerun to retry them"
            )
        records = self.ledger.done().values()
        return {
            "shards": total,
            "samples_in": sum(r.samples_in for r in records),
            "samples_out": sum(r.samples_out for r in records),
            "counts": {DROP_REASON: sum(r.counts.get(DROP_REASON, 0) for r in records)},
        }

    def embed_dim(self) -> int:
        from transformers import CLIPConfig

        return CLIPConfig.from_pretrained(clip_path(self.recipe, self.output_dir)).projection_dim

    def encode(self, ctx: RunContext, todo: list[dict], dvae_url: str, tokenizer: str, text_len: int) -> None:
        import ray.data

        actors, gpus, cpus = self.pool()
        actors = min(actors, len(todo))
        spec = {
            "dvae": dvae_url,
            "clip": clip_path(self.recipe, self.output_dir),
            "tokenizer": tokenizer,
            "text_len": text_len,
            "batch_size": self.cfg.batch_size,
            "precision": self.cfg.precision,
            "gpus": gpus,
            "cpus": cpus,
            "common": {
                "stage_url": self.url,
                "threshold": self.cfg.clip_threshold,
                "fingerprint": ctx.fingerprint.digest,
            },
        }
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        log.info("encode: %d shards on %d actors (%.1f GPU, %.1f CPU each)", len(todo), actors, gpus, cpus)
        dataset = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            ShardEncoder,
            fn_constructor_kwargs={"spec": spec},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=cpus,
            max_restarts=self.cfg.max_task_retries,
            max_task_retries=self.cfg.max_task_retries,
        )
        started, samples = time.monotonic(), 0
        for row in dataset.iter_rows():
            if row["error"]:
                log.warning("encode: shard %s failed: %s", row["shard"], row["error"])
            samples += int(row["samples_out"])
            ctx.progress.advance(self.name, samples / max(time.monotonic() - started, 1e-6))
