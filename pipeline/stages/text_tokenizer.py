"""text-tokenizer: filtered captions → `tokenizer.json` (one task, committed like a shard).

The task streams the captions from the filtered shards, shard by shard in key order, into HF
tokenizers' `train_from_iterator`: it never holds the captions, and at most `max_captions` of them
(a sample chosen by a hash of the key, so the same for every run) go into training. The length
statistics come from `encode_batch` over a smaller sample of the same stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
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
STATS_SAMPLE = 100_000
"""Captions (about) whose token lengths make `stats.json`."""


def _picked(key: str, share: float) -> bool:
    """Whether the sample `key` is in a deterministic sample of `share` of all keys."""
    if share >= 1.0:
        return True
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") < share * 2**64


class CaptionStream:
    """The filtered captions, shard by shard in key order, sampled to about `max_captions`; keeps
    a smaller sample of what it yielded for the statistics."""

    def __init__(self, filter_url: str, max_captions: int | None):
        self.records = sorted(Ledger(filter_url).done().items())
        self.filter_url = filter_url
        total = sum(r.samples_out for _, r in self.records)
        self.share = 1.0 if max_captions is None or total <= max_captions else max_captions / total
        self.stats_share = min(1.0, STATS_SAMPLE / max(1.0, total * self.share))
        self.yielded = 0
        self.sample: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for _, record in self.records:
            manifest = storage.read_parquet(storage.join(self.filter_url, record.files[1])).select(["key", "caption"])
            for key, caption in zip(manifest["key"].to_pylist(), manifest["caption"].to_pylist()):
                if _picked(key, self.share):
                    self.yielded += 1
                    if _picked(key[::-1], self.stats_share):
                        self.sample.append(caption)
                    yield caption


def train_on(captions: CaptionStream, cfg: TextTokenizerSection, attempt: Attempt) -> ShardResult:
    """Trains the BPE tokenizer on the stream into `tokenizer.json` and its `stats.json`."""
    tok = train_tokenizer(captions, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, lowercase=cfg.lowercase)
    if not captions.yielded:
        raise InputError(f"text-tokenizer: {captions.filter_url} holds no captions to train on")
    attempt.write("tokenizer.json", tok.to_str(pretty=True).encode())
    text = TextTokenizer(tok, cfg.text_len)
    lengths = np.array([len(e.ids) for e in tok.encode_batch(captions.sample)] or [0])
    stats = {
        "vocab_size": text.vocab_size,
        "trained_on": captions.yielded,
        "mean_tokens": round(float(lengths.mean()), 2),
        "truncated_share": round(float((lengths > cfg.text_len).mean()), 4),
        "stats_sample": len(captions.sample),
    }
    storage.write_json(attempt.path("stats.json"), stats)
    return ShardResult(samples_in=captions.yielded, samples_out=text.vocab_size)


class TextTokenizerStage(Stage):
    name = "text-tokenizer"
    config_key = "text_tokenizer"
    upstream = ("filter",)

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        return train_on(CaptionStream(self.upstream_url("filter"), self.cfg.max_captions), self.cfg, attempt)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        self.write_plan(1)
        record = self.run_shards(ctx, [ShardTask(SHARD)])[SHARD]
        stats = storage.read_json(storage.join(self.url, "stats.json"))
        return {"shards": 1, "samples_in": record.samples_in, "samples_out": 1, **stats, "counts": record.counts}
