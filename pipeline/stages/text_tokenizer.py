"""text-tokenizer: filtered captions → `tokenizer.json` (one task, committed like a shard)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import TextTokenizerConfig
from pipeline.executor import ShardTask
from pipeline.ledger import Ledger, ShardRecord
from pipeline.stages.base import InputError, RunContext, Stage
from pipeline.text_tokenizer import TextTokenizer, train_tokenizer

SHARD = "tokenizer"


def filtered_captions(filter_url: str) -> list[str]:
    """Every filtered caption, in key order (so training is deterministic)."""
    rows: list[tuple[str, str]] = []
    for record in Ledger(filter_url).done().values():
        manifest = storage.read_parquet(storage.join(filter_url, record.files[1]))
        rows.extend(zip(manifest["key"].to_pylist(), manifest["caption"].to_pylist()))
    return [caption for _, caption in sorted(rows)]


def train_task(payload: dict[str, Any]) -> ShardRecord:
    started = time.monotonic()
    cfg = TextTokenizerConfig.model_validate(payload["cfg"])
    captions = filtered_captions(payload["filter_url"])
    if not captions:
        raise InputError(f"text-tokenizer: {payload['filter_url']} holds no captions to train on")
    tok = train_tokenizer(captions, cfg)
    ledger = Ledger(payload["stage_url"])
    tmp = ledger.attempt_dir(SHARD)
    storage.write_atomic(storage.join(tmp, "tokenizer.json"), tok.to_str(pretty=True).encode())
    text = TextTokenizer(tok, cfg.text_len)
    lengths = np.array([len(text.ids(c)) for c in captions])
    stats = {"vocab_size": text.vocab_size, "mean_tokens": round(float(lengths.mean()), 2)}
    storage.write_json(storage.join(tmp, "stats.json"), stats)
    return ledger.commit_files(
        SHARD,
        tmp,
        ["tokenizer.json", "stats.json"],
        samples_in=len(captions),
        samples_out=text.vocab_size,
        fingerprint=payload["fingerprint"],
        started=started,
        counts={"truncated": int((lengths > cfg.text_len).sum())},
    )


class TextTokenizerStage(Stage):
    name = "text-tokenizer"
    config_key = "text_tokenizer"
    upstream = ("filter",)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        self.write_plan(1)
        payload = {
            "cfg": self.cfg.model_dump(mode="json"),
            "filter_url": self.upstream_url("filter"),
            "stage_url": self.url,
            "fingerprint": ctx.fingerprint.digest,
        }
        record = self.run_shards(ctx, [ShardTask(SHARD, payload)], train_task)[SHARD]
        stats = storage.read_json(storage.join(self.url, "stats.json"))
        return {"shards": 1, "samples_in": record.samples_in, "samples_out": 1, **stats, "counts": record.counts}
