"""What the encode stage hands each worker (`EncodeTask`) and the drop reason it counts: the
driver's side of `encode_shard`, without its models."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.engine.tasks import ShardTask

DROP_REASON = "clip_similarity"
"""The count of pairs dropped under `encode.clip_threshold`."""


@dataclass(frozen=True)
class EncodeTask(ShardTask):
    """Encode one filtered shard."""

    url: str
    """The filtered shard's tar."""
    manifest: str
    """Its parquet manifest."""
    count: int
    """Samples it holds (from filter's ledger)."""
