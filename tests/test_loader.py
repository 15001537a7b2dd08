"""The training loader: deterministic order, equal rank slices, exact resume, loud failure on a
truncated shard."""

from __future__ import annotations

import itertools
import os
import signal

import pytest

from pipeline.data.loader import BatchLayout, ShardSpan, ShardStream, read_span, split_holdout
from pipeline.data.shards import write_tar
from pipeline.errors import DamagedShard, ShardError


@pytest.fixture
def spans(tmp_path):
    """Five shards of uneven sizes (7, 3, 5, 1, 4 samples) whose samples carry their own key."""
    out, n = [], 0
    for i, size in enumerate([7, 3, 5, 1, 4]):
        url = str(tmp_path / f"{i:05d}.tar")
        write_tar(url, [{"__key__": f"{n + j:04d}", "txt": f"{n + j:04d}"} for j in range(size)])
        out.append(ShardSpan(url, size))
        n += size
    return out


def _keys(spans, rank, world, seed=0, n=None, position=0, shuffle=True):
    stream = ShardStream(spans, rank=rank, world=world, seed=seed, decode=lambda s: s["__key__"], shuffle=shuffle)
    return list(itertools.islice(stream.samples(position), n if n is not None else stream.per_rank))


def test_one_epoch_across_ranks_covers_every_sample_once_but_the_remainder(spans):
    total = sum(s.count for s in spans)  # 20
    for world in (1, 2, 3):
        slices = [_keys(spans, r, world) for r in range(world)]
        assert {len(s) for s in slices} == {total // world}  # equal steps: no rank waits forever
        seen = [k for s in slices for k in s]
        assert len(seen) == len(set(seen)) == total - total % world


def test_order_is_a_function_of_seed_and_epoch(spans):
    assert _keys(spans, 0, 1, seed=1) == _keys(spans, 0, 1, seed=1)
    assert _keys(spans, 0, 1, seed=1) != _keys(spans, 0, 1, seed=2)
    two_epochs = _keys(spans, 0, 1, n=40)
    assert sorted(two_epochs[:20]) == sorted(two_epochs[20:]) and two_epochs[:20] != two_epochs[20:]
    assert _keys(spans, 0, 1, shuffle=False) == [f"{i:04d}" for i in range(20)]


@pytest.mark.parametrize("position", [0, 1, 6, 9, 10, 23, 31])
def test_resume_from_a_position_continues_the_same_sequence(spans, position):
    for rank in (0, 1):
        whole = _keys(spans, rank, 2, n=40)
        assert _keys(spans, rank, 2, n=40 - position, position=position) == whole[position:]


def test_batches_are_cut_from_the_continuous_stream(spans):
    stream = ShardStream(spans, rank=1, world=2, seed=0, decode=lambda s: s["__key__"])
    batches = list(itertools.islice(stream.batches(4), 6))
    assert [k for b in batches for k in b] == _keys(spans, 1, 2, n=24)


def test_holdout_takes_the_tail_and_training_never_sees_it(spans):
    train, held = split_holdout(spans, 6)
    held_keys = [s["__key__"] for span in held for s in read_span(span)]
    assert held_keys == [f"{i:04d}" for i in range(14, 20)]
    seen = set(_keys(train, 0, 1, n=14 * 3))
    assert seen == {f"{i:04d}" for i in range(14)}


def test_a_truncated_shard_is_refused_loudly(spans):
    path = spans[0].url
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(DamagedShard, match="00000.tar: cannot read shard"):
        list(itertools.islice(ShardStream(spans, rank=0, world=1, seed=0, decode=lambda s: s).samples(), 20))


def test_a_shard_the_store_cannot_read_is_a_shard_error_but_not_damaged(spans):
    """A read that failed (a missing object, a store that did not answer) may work the next time:
    Ray Train restarts into it; only bytes that are bad are a DamagedShard, which it does not."""
    missing = ShardSpan(spans[0].url.replace("00000.tar", "00099.tar"), 5)
    with pytest.raises(ShardError, match="00099.tar: cannot read shard") as err:
        read_span(missing)
    assert not isinstance(err.value, DamagedShard)


def test_a_shard_shorter_than_its_ledger_is_refused(spans):
    short = [ShardSpan(spans[1].url, spans[1].count + 2)]
    with pytest.raises(DamagedShard, match="holds 3 samples, its ledger says at least 5"):
        read_span(short[0])


def test_too_few_samples_for_the_ranks(spans):
    with pytest.raises(ShardError, match="cannot feed 30 ranks"):
        ShardStream(spans, rank=0, world=30, seed=0, decode=lambda s: s)


def _key(sample):
    return sample["__key__"]


def test_loader_workers_keep_the_sequence(spans):
    """Decoding in 2 DataLoader processes yields the very batches of in-process decoding,
    across an epoch boundary and from a resume position."""
    stream = ShardStream(spans, rank=1, world=2, seed=3, decode=_key)
    ref = list(itertools.islice(stream.batches(3, position=4), 9))
    assert [len(b) for b in ref] == [3] * 9  # 4 + 27 samples: three epochs of a 10-sample slice
    assert list(itertools.islice(stream.batches(3, position=4, workers=2), 9)) == ref


def _update_keys(layout, spans, world, steps, start=0):
    """step -> sorted keys of every slot of that update, over all ranks of `world`."""
    per_rank = [
        layout.rank_batches(spans, r, world, seed=5, decode=_key, batch_size=2, step=start) for r in range(world)
    ]
    out = {}
    for step in range(start, start + steps):
        keys = []
        for updates in per_rank:
            for _, batch in next(updates):
                keys += batch
        out[step] = sorted(keys)
    return out


def test_a_run_resumed_on_another_world_size_trains_each_update_on_the_same_samples(spans):
    """Lanes x per-lane micro-batches make an update; 4 slots split over 4, 2 or 1 workers give the
    same samples at every step (across epochs too), so 2 -> 1 -> 4 workers = an uninterrupted run."""
    layout = BatchLayout(lanes=2, per_lane=2)
    ref = _update_keys(layout, spans, 2, 12)
    assert all(len(v) == 8 for v in ref.values())
    changed = {**_update_keys(layout, spans, 2, 3), **_update_keys(layout, spans, 1, 4, 3)}
    changed.update(_update_keys(layout, spans, 4, 5, 7))
    assert changed == ref
    assert layout.owned(1, 2) == [(1, 0), (1, 1)] and layout.owned(0, 1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.owned(3, 4) == [(1, 1)]
    assert layout.problem(4) is None and layout.problem(3).endswith("use a worker count that divides 4")


def test_the_layout_of_a_fresh_run_reads_as_the_plain_stream(spans):
    """With one lane per worker and one micro-batch each, rank r's batches are its ShardStream's."""
    layout = BatchLayout(lanes=2, per_lane=1)
    stream = ShardStream(spans, rank=1, world=2, seed=5, decode=_key)
    got = [
        batch
        for update in itertools.islice(layout.rank_batches(spans, 1, 2, seed=5, decode=_key, batch_size=3, step=2), 4)
        for _, batch in update
    ]
    assert got == list(itertools.islice(stream.batches(3, position=6), 4))


def test_loader_workers_read_each_shard_once_between_them(spans, tmp_path, monkeypatch):
    """Each of 2 workers fetches only the shards it decodes: worker w reads visits w, w + 2, ... of
    the stream, so each visit's shard is read once, by one worker (a DataLoader over the stream would
    have both read every shard)."""
    from pipeline.data import loader

    expected = _keys(spans, 0, 1, seed=3, n=40)
    stream = ShardStream(spans, rank=0, world=1, seed=3, decode=_key)
    visits = [spans[v.index].url for v in itertools.islice(stream.visits(), 20)]
    log = tmp_path / "reads.log"
    real = loader.read_span

    def logged(span):  # inherited by the forked workers
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {span.url}\n")
        return real(span)

    monkeypatch.setattr(loader, "read_span", logged)
    batches = list(itertools.islice(stream.batches(4, workers=2), 10))  # 40 samples: 2 epochs, 10 visits
    assert [k for b in batches for k in b] == expected
    reads: dict[str, list[str]] = {}
    for pid, url in (line.split() for line in log.read_text().splitlines()):
        reads.setdefault(pid, []).append(url)
    assert len(reads) == 2 and str(os.getpid()) not in reads  # two workers read; the consumer did not
    own = sorted(reads.values(), key=lambda urls: visits.index(urls[0]))
    for worker, urls in enumerate(own):  # each worker read its own visits, in order, each once
        assert urls == visits[worker::2][: len(urls)]
        assert len(urls) >= 5  # its five of the ten visits the batches took (plus at most a few ahead)


def test_a_loader_worker_that_fails_or_dies_is_reported_in_one_line(spans):
    truncated = spans[2].url
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    stream = ShardStream(spans, rank=0, world=1, seed=0, decode=_key, shuffle=False)
    with pytest.raises(DamagedShard, match="00002.tar: cannot read shard"):  # still a DamagedShard
        list(itertools.islice(stream.batches(2, workers=2), 10))

    from pipeline.data.decode_workers import DecodeWorkers

    healthy = ShardStream(spans[:2], rank=0, world=1, seed=0, decode=_key)
    workers = DecodeWorkers(healthy, 2, 0, chunk=2)
    samples = workers.samples()
    next(samples)
    os.kill(workers.processes[1].pid, signal.SIGKILL)
    with pytest.raises(ShardError, match=r"loader worker 1 stopped \(exit code -9\)") as died:
        list(itertools.islice(samples, 30))
    assert not isinstance(died.value, DamagedShard)  # a restart may well get through
    assert not any(p.is_alive() for p in workers.processes)
