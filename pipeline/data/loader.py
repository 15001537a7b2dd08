"""The training loader: a deterministic, resumable stream of samples over committed shards.

The sample order is a pure function of (seed, epoch): each epoch permutes the shards and the
samples inside each shard. Rank r of W reads the contiguous slice [r·n, (r+1)·n) of each epoch's
order, n = total // W, so every rank takes the same number of steps (no hang on uneven shards).
The `total % W` samples past the last slice are left out of that epoch (a different set each
epoch, logged once). A rank's position is the number of samples it has consumed; a resumed
stream given that position yields exactly what the uninterrupted one would have.

Shard lengths come from the ledger, so planning reads no data; a shard that holds fewer samples
than its ledger says (truncated, rewritten) is an error, never a silent skip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.shards import Sample, iter_samples
from pipeline.ledger import Ledger

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard that does not hold what its ledger record says."""


@dataclass(frozen=True)
class ShardSpan:
    """Samples [start, start + count) of the tar at `url`, in file order."""

    url: str
    count: int
    start: int = 0


def ledger_spans(stage_url: str) -> list[ShardSpan]:
    """Every committed shard of a stage, in shard order, with its sample count from the ledger."""
    spans = []
    for shard, record in sorted(Ledger(stage_url).done().items()):
        tars = [f for f in record.files if f.endswith(".tar")]
        if len(tars) != 1:
            raise ShardError(f"{stage_url}: ledger record of shard {shard} names {len(tars)} tar files")
        if record.samples_out:
            spans.append(ShardSpan(storage.join(stage_url, tars[0]), record.samples_out))
    return spans


def split_holdout(spans: list[ShardSpan], holdout: int) -> tuple[list[ShardSpan], list[ShardSpan]]:
    """Keeps the last `holdout` samples (in shard order) out of training: (train, held-out)."""
    train, held = list(spans), []
    while holdout > 0 and train:
        last = train.pop()
        take = min(holdout, last.count)
        held.insert(0, ShardSpan(last.url, take, last.start + last.count - take))
        if take < last.count:
            train.append(ShardSpan(last.url, last.count - take, last.start))
        holdout -= take
    return train, held


def read_span(span: ShardSpan) -> list[Sample]:
    """The span's samples; raises ShardError if the shard is unreadable or holds fewer."""
    samples: list[Sample] = []
    end = span.start + span.count
    try:
        for sample in iter_samples(span.url):
            samples.append(sample)
            if len(samples) == end:
                break
    except Exception as err:  # a truncated or unreadable tar: refuse loudly
        raise ShardError(f"{span.url}: cannot read shard: {err}") from None
    if len(samples) < end:
        raise ShardError(f"{span.url}: holds {len(samples)} samples, its ledger says at least {end}")
    return samples[span.start :]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class ShardStream:
    """Yields decoded samples for one rank, forever (epoch after epoch), from `position` on."""

    def __init__(
        self,
        spans: list[ShardSpan],
        *,
        rank: int,
        world: int,
        seed: int,
        decode: Callable[[Sample], Any],
        shuffle: bool = True,
    ):
        self.spans, self.rank, self.world, self.seed = spans, rank, world, seed
        self.decode, self.shuffle = decode, shuffle
        self.total = sum(s.count for s in spans)
        self.per_rank = self.total // world
        if self.per_rank == 0:
            raise ShardError(f"{self.total} samples cannot feed {world} ranks")
        if self.total % world and rank == 0:
            log.info(
                "each epoch leaves %d of %d samples out to keep %d ranks equal", self.total % world, self.total, world
            )

    def epoch_order(self, epoch: int) -> list[int]:
        """Shard indices in the order epoch `epoch` reads them."""
        order = np.arange(len(self.spans))
        if self.shuffle:
            _rng(self.seed, epoch).shuffle(order)
        return order.tolist()

    def _epoch_samples(self, epoch: int, start: int) -> Iterator[Sample]:
        """This rank's samples of `epoch`, skipping the first `start` of its slice."""
        lo, hi = self.rank * self.per_rank + start, (self.rank + 1) * self.per_rank
        offset = 0
        for index in self.epoch_order(epoch):
            span = self.spans[index]
            first, last = max(lo, offset), min(hi, offset + span.count)
            if first < last:
                samples = read_span(span)
                perm = np.arange(span.count)
                if self.shuffle:
                    _rng(self.seed, epoch, index, 1).shuffle(perm)
                for i in perm[first - offset : last - offset]:
                    yield samples[i]
            offset += span.count
            if offset >= hi:
                return

    def samples(self, position: int = 0) -> Iterator[Any]:
        """Decoded samples from `position` (samples this rank already consumed) on."""
        epoch, start = divmod(position, self.per_rank)
        while True:
            for sample in self._epoch_samples(epoch, start):
                yield self.decode(sample)
            epoch, start = epoch + 1, 0

    def batches(self, batch_size: int, position: int = 0) -> Iterator[list[Any]]:
        """Lists of `batch_size` decoded samples, cut from the continuous stream."""
        batch: list[Any] = []
        for item in self.samples(position):
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
