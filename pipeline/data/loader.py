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

With `workers` > 0 a rank's samples are read and decoded by that many processes, worker w taking
the stream's shard reads ("visits") w, w + workers, ...: each shard is fetched by one worker, not
by every one, and the consumer takes the visits back in order, so the sequence is the same for any
number of workers (a run may resume with a different `loader_workers`; `decode_workers`).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.shards import Sample, iter_samples
from pipeline.errors import DamagedShard, ShardError

log = logging.getLogger(__name__)

EPOCH = "__epoch__"
"""The field a training stream adds to each sample it yields: the epoch it is read in (what a
decode seeds per-epoch augmentation from, such as BPE dropout)."""


@dataclass(frozen=True)
class Visit:
    """One read of a shard by a rank's stream: samples [first, last) of the shard's order in `epoch`
    (a rank's slice of an epoch starts and ends inside shards)."""

    epoch: int
    index: int
    """The span's index in the stream's span list."""
    first: int
    last: int


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
    """The span's samples. Raises DamagedShard for a tar that is truncated, corrupt or holds fewer
    samples (the same on every read), ShardError when reading failed otherwise (the store)."""
    samples: list[Sample] = []
    end = span.start + span.count
    try:
        for sample in iter_samples(span.url):
            samples.append(sample)
            if len(samples) == end:
                break
    except Exception as err:  # refuse loudly, saying whether the bytes themselves are bad
        detail = str(err).removeprefix(f"{span.url}: ")
        kind = DamagedShard if isinstance(err, (tarfile.TarError, EOFError, UnicodeDecodeError)) else ShardError
        raise kind(f"{span.url}: cannot read shard: {detail}{_redo_hint(span.url)}") from None
    if len(samples) < end:
        raise DamagedShard(
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

    def _epoch_visits(self, epoch: int, start: int) -> Iterator[Visit]:
        """The shard reads of this rank's slice of `epoch`, skipping its first `start` samples."""
        lo, hi = self.rank * self.per_rank + start, (self.rank + 1) * self.per_rank
        offset = 0
        for index in self.epoch_order(epoch):
            span = self.spans[index]
            first, last = max(lo, offset), min(hi, offset + span.count)
            if first < last:
                yield Visit(epoch, index, first - offset, last - offset)
            offset += span.count
            if offset >= hi:
                return

    def visits(self, position: int = 0) -> Iterator[Visit]:
        """The shard reads of the stream from `position` (samples this rank already consumed) on."""
        epoch, start = divmod(position, self.per_rank)
        while True:
            yield from self._epoch_visits(epoch, start)
            epoch, start = epoch + 1, 0

    def visit_samples(self, visit: Visit) -> list[Sample]:
        """The undecoded samples of one visit, in stream order (one read of its shard)."""
        span = self.spans[visit.index]
        samples = read_span(span)
        perm = np.arange(span.count)
        if self.shuffle:
            _rng(self.seed, visit.epoch, visit.index, 1).shuffle(perm)
        out = []
        for i in perm[visit.first : visit.last]:
            sample = samples[i]
            sample[EPOCH] = visit.epoch
            out.append(sample)
        return out

    def raw_samples(self, position: int = 0) -> Iterator[Sample]:
        """Undecoded samples from `position` (samples this rank already consumed) on."""
        for visit in self.visits(position):
            yield from self.visit_samples(visit)

    def samples(self, position: int = 0) -> Iterator[Any]:
        """Decoded samples from `position` on."""
        return map(self.decode, self.raw_samples(position))

    def raw_batches(self, batch_size: int, position: int = 0) -> Iterator[list[Sample]]:
        """Lists of `batch_size` undecoded samples, cut from the continuous stream."""
        return _cut(self.raw_samples(position), batch_size)

    def batches(self, batch_size: int, position: int = 0, workers: int = 0) -> Iterator[list[Any]]:
        """Lists of `batch_size` decoded samples; decoded by `workers` processes when > 0, each
        reading only its own shards (`pipeline.data.decode_workers`)."""
        if workers == 0:
            return ([self.decode(s) for s in batch] for batch in self.raw_batches(batch_size, position))
        from pipeline.data.decode_workers import DecodeWorkers

        return _cut(DecodeWorkers(self, workers, position, chunk=batch_size).samples(), batch_size)


def _cut(samples: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []


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
