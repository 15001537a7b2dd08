"""The training loader: a deterministic, resumable stream of samples over committed shards.

The sample order is a pure function of (seed, epoch): each epoch permutes the shards and the
samples inside each shard. Rank r of W reads the contiguous slice [r·n, (r+1)·n) of each epoch's
order, n = total // W, so every rank takes the same number of steps (no hang on uneven shards).
The `total % W` samples past the last slice are left out of that epoch (a different set each
epoch, logged once). A rank's position is the number of samples it has consumed; a resumed
stream given that position yields exactly what the uninterrupted one would have.

Shard lengths come from the ledger (`Ledger.spans`), so planning reads no data; a shard that holds fewer samples
than its ledger says (truncated, rewritten) is an error, never a silent skip.

A training run reads through a `BatchLayout` fixed when it starts: `lanes` streams (a ShardStream
each, lane l reading slice l of every epoch: the run's first worker count) times `per_lane`
consecutive micro-batches of each per update (its first grad_accum). Those lanes x per_lane slots
make one update whatever the number of workers: on M workers rank r takes slots [r·S/M, (r+1)·S/M)
(S = lanes x per_lane) as its micro-batches, so a run resumed on another world size trains every
update on exactly the samples of the uninterrupted run (only which rank computes which slot moves).

With `workers` > 0 a rank's batches are decoded by that many DataLoader processes: worker w
decodes batches w, w + workers, ... of the rank's sequence, and the DataLoader hands them back
round-robin, so the sequence is the same for any number of workers (a run may resume with a
different `loader_workers`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shards import Sample, iter_samples
from pipeline.errors import ShardError

log = logging.getLogger(__name__)

EPOCH = "__epoch__"
"""The field a training stream adds to each sample it yields: the epoch it is read in (what a
decode seeds per-epoch augmentation from, such as BPE dropout)."""


@dataclass(frozen=True)
class ShardSpan:
    """Samples [start, start + count) of the tar at `url`, in file order."""

    url: str
    count: int
    start: int = 0


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


def _redo_hint(url: str) -> str:
    stage = url.rsplit("/", 1)[0]
    return f"; `dalle validate {stage} --drop-damaged`, then rerun to make the damaged shards again"


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
        detail = str(err).removeprefix(f"{span.url}: ")
        raise ShardError(f"{span.url}: cannot read shard: {detail}{_redo_hint(span.url)}") from None
    if len(samples) < end:
        raise ShardError(
            f"{span.url}: holds {len(samples)} samples, its ledger says at least {end}{_redo_hint(span.url)}"
        )
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
                    sample = samples[i]
                    sample[EPOCH] = epoch
                    yield sample
            offset += span.count
            if offset >= hi:
                return

    def raw_samples(self, position: int = 0) -> Iterator[Sample]:
        """Undecoded samples from `position` (samples this rank already consumed) on."""
        epoch, start = divmod(position, self.per_rank)
        while True:
            yield from self._epoch_samples(epoch, start)
            epoch, start = epoch + 1, 0

    def samples(self, position: int = 0) -> Iterator[Any]:
        """Decoded samples from `position` on."""
        return map(self.decode, self.raw_samples(position))

    def raw_batches(self, batch_size: int, position: int = 0) -> Iterator[list[Sample]]:
        """Lists of `batch_size` undecoded samples, cut from the continuous stream."""
        batch: list[Sample] = []
        for sample in self.raw_samples(position):
            batch.append(sample)
            if len(batch) == batch_size:
                yield batch
                batch = []

    def batches(self, batch_size: int, position: int = 0, workers: int = 0) -> Iterator[list[Any]]:
        """Lists of `batch_size` decoded samples; decoded by `workers` DataLoader processes when > 0."""
        if workers == 0:
            return ([self.decode(s) for s in batch] for batch in self.raw_batches(batch_size, position))
        dataset = _WorkerBatches(self, batch_size, position)
        return iter(DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_as_is, prefetch_factor=4))


@dataclass(frozen=True)
class BatchLayout:
    """The slots of one update (see the module docstring); fixed for the life of a run."""

    lanes: int
    per_lane: int

    @property
    def slots(self) -> int:
        return self.lanes * self.per_lane

    def problem(self, world: int) -> str | None:
        """Why `world` workers cannot share this layout's updates equally, or None."""
        if self.slots % world:
            return (
                f"the run's updates are {self.slots} micro-batches ({self.lanes} lanes x {self.per_lane}), "
                f"which {world} workers cannot share equally; use a worker count that divides {self.slots}"
            )
        return None

    def owned(self, rank: int, world: int) -> list[tuple[int, int]]:
        """(lane, index within the lane's update) of each micro-batch rank `rank` of `world` computes,
        in the order it computes them."""
        if self.problem(world):
            raise ValueError(self.problem(world))
        share = self.slots // world
        return [divmod(i, self.per_lane) for i in range(rank * share, (rank + 1) * share)]

    def rank_batches(
        self,
        spans: list[ShardSpan],
        rank: int,
        world: int,
        *,
        seed: int,
        decode,
        batch_size: int,
        step: int,
        workers: int = 0,
    ) -> Iterator[list[tuple[tuple[int, int], list[Any]]]]:
        """For each update from `step` on: this rank's micro-batches, each with its slot."""
        owned = self.owned(rank, world)
        streams = {
            lane: ShardStream(spans, rank=lane, world=self.lanes, seed=seed, decode=decode).batches(
                batch_size, position=step * batch_size * self.per_lane, workers=workers
            )
            for lane in dict.fromkeys(lane for lane, _ in owned)
        }
        wanted = set(owned)
        while True:
            update = []
            for lane, stream in streams.items():
                for index in range(self.per_lane):
                    batch = next(stream)  # a lane shared by several ranks is read by each; each keeps its slots
                    if (lane, index) in wanted:
                        update.append(((lane, index), batch))
            yield update


def _as_is(item: Any) -> Any:
    return item


class _WorkerBatches(IterableDataset):
    """Batch i of the rank's stream is decoded by DataLoader worker i % workers."""

    def __init__(self, stream: ShardStream, batch_size: int, position: int):
        self.stream, self.batch_size, self.position = stream, batch_size, position

    def __iter__(self) -> Iterator[list[Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, batch in enumerate(self.stream.raw_batches(self.batch_size, self.position)):
            if index % workers == worker:
                yield [self.stream.decode(s) for s in batch]
