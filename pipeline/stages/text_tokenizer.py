"""text-tokenizer: filtered captions → `tokenizer.json` (one task, committed like a shard)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config.data import TextTokenizerSection
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.tasks import ShardTask
from pipeline.errors import InputError
from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.stages.base import RunContext, Stage

SHARD = "tokenizer"


def filtered_captions(filter_url: str) -> list[str]:
    """Every filtered caption, in key order (so training is deterministic)."""
    rows: list[tuple[str, str]] = []
    for record in Ledger(filter_url).done().values():
        manifest = storage.read_parquet(storage.join(filter_url, record.files[1]))
        rows.extend(zip(manifest["key"].to_pylist(), manifest["caption"].to_pylist()))
    return [caption for _, caption in sorted(rows)]


def train_on(captions: list[str], cfg: TextTokenizerSection, attempt: Attempt) -> ShardResult:
    """Trains the BPE tokenizer on `captions` into `tokenizer.json` and its `stats.json`."""
    tok = train_tokenizer(captions, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, lowercase=cfg.lowercase)
    attempt.write("tokenizer.json", tok.to_str(pretty=True).encode())
    text = TextTokenizer(tok, cfg.text_len)
    lengths = np.array([len(text.ids(c)) for c in captions])
    stats = {"vocab_size": text.vocab_size, "mean_tokens": round(float(lengths.mean()), 2)}
    storage.write_json(attempt.path("stats.json"), stats)
    counts = {"truncated": int((lengths > cfg.text_len).sum())}
    return ShardResult(samples_in=len(captions), samples_out=text.vocab_size, counts=counts)


class TextTokenizerStage(Stage):
    name = "text-tokenizer"
    config_key = "text_tokenizer"
    upstream = ("filter",)

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        captions = filtered_captions(self.upstream_url("filter"))
        if not captions:
            raise InputError(f"text-tokenizer: {self.upstream_url('filter')} holds no captions to train on")
        return train_on(captions, self.cfg, attempt)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        self.write_plan(1)
        record = self.run_shards(ctx, [ShardTask(SHARD)])[SHARD]
        stats = storage.read_json(storage.join(self.url, "stats.json"))
        return {"shards": 1, "samples_in": record.samples_in, "samples_out": 1, **stats, "counts": record.counts}
