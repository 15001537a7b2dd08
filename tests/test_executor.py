"""The executor on a real local Ray, as Ray tasks and on an actor pool alike: failed shards are
recorded and reported in one line, the others are committed, and a rerun retries only what is
missing."""

from __future__ import annotations

import pytest
import ray

from pipeline.engine.executor import run_shards
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.tasks import Placement, ShardTask, ShardWorker
from pipeline.errors import StageFailed
from pipeline.observe.progress import StageProgress
from pipeline.stages.ingest import classify_error


def make_worker(fail_on: set[str]) -> ShardWorker:
    class Worker(ShardWorker):  # defined here, so Ray pickles it by value
        def setup(self, placement: Placement) -> None:
            self.loaded = placement

        def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
            if task.shard in fail_on:
                raise ValueError(f"bad input in {task.shard}\nsecond line")
            where = self.loaded.actors or ("a pool" if self.loaded.pool else "a task")
            attempt.write(f"{task.shard}.txt", f"{task.shard} made on {where}".encode())
            return ShardResult(samples_in=3, samples_out=3)

    return Worker()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize(
    "placement",
    [Placement(cpus=1), Placement(cpus=1, actors=2, pool=True), Placement(cpus=1, pool=True)],
    ids=["tasks", "pool", "autoscaling-pool"],
)
def test_failures_are_recorded_and_a_rerun_retries_only_them(tmp_path, local_ray, placement):
    ledger = Ledger(str(tmp_path))
    tasks = [ShardTask(f"{i:05d}") for i in range(5)]
    with StageProgress(enabled=False) as progress, pytest.raises(StageFailed) as info:
        run = dict(fingerprint="f", label="t", progress=progress, placement=placement)
        run_shards(ledger, tasks, make_worker({"00003"}), retries=1, **run)
    assert str(info.value) == (
        "stage 't': 1 of 5 shards failed after 1 retries (first: shard 00003: ValueError: bad input in 00003); "
        "rerun to retry them"
    )
    assert sorted(ledger.done()) == ["00000", "00001", "00002", "00004"]
    assert ledger.failures()["00003"]["error"] == "ValueError: bad input in 00003"
    made_on = placement.actors or ("a pool" if placement.pool else "a task")
    assert (tmp_path / "00001.txt").read_text() == f"00001 made on {made_on}"
    assert ledger.record("00001").files == ("00001.txt",) and ledger.record("00001").fingerprint == "f"

    before = {s: r.finished_at for s, r in ledger.done().items()}
    with StageProgress(enabled=False) as progress:
        run = dict(fingerprint="f", label="t", progress=progress, placement=placement)
        records = run_shards(ledger, tasks, make_worker(set()), **run)
    after = {s: r.finished_at for s, r in ledger.done().items()}
    assert {s: after[s] for s in before} == before  # committed shards were not run again
    assert sorted(records) == [t.shard for t in tasks]
    assert ledger.failures() == {}
    assert sorted(ledger.done()) == [t.shard for t in tasks]
    assert not list((tmp_path / "_tmp").iterdir())  # the failed tries left nothing behind once retried


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_4xx"),
        ("HTTP Error 503: Service Unavailable", "http_5xx"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("The read operation timed out", "timeout"),
        ("Image decoding error", "decode_error"),
        ("Use of image disallowed by X-Robots-Tag directive", "disallowed"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_img2dataset_errors_map_to_failure_reasons(message, reason):
    assert classify_error(message) == reason
