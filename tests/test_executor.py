"""The executor on a real local Ray: failed shards are recorded and reported in one line, the
others are committed, and a rerun retries only what is missing."""

from __future__ import annotations

import pytest
import ray

from pipeline.executor import ShardTask, StageFailed, run_tasks
from pipeline.ledger import Ledger, ShardRecord
from pipeline.progress import StageProgress
from pipeline.stages.ingest import classify_error


def make_task(fail_on: set[str]):
    def task(payload: dict) -> ShardRecord:
        if payload["shard"] in fail_on:
            raise ValueError(f"bad input in {payload['shard']}")
        record = ShardRecord(
            shard=payload["shard"], samples_in=3, samples_out=3, files=(), checksum="", fingerprint="f"
        )
        Ledger(payload["root"]).commit(record)
        return record

    return task


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_failures_are_recorded_and_a_rerun_retries_only_them(tmp_path, local_ray):
    ledger = Ledger(str(tmp_path))
    tasks = [ShardTask(f"{i:05d}", {"shard": f"{i:05d}", "root": str(tmp_path)}) for i in range(5)]
    with StageProgress(enabled=False) as progress, pytest.raises(StageFailed) as info:
        run_tasks(ledger, tasks, make_task({"00003"}), label="t", progress=progress, max_retries=1)
    assert str(info.value).startswith("stage 't': 1 of 5 shards failed after 1 retries (first: shard 00003: ")
    assert "bad input in 00003" in str(info.value) and "\n" not in str(info.value)
    assert sorted(ledger.done()) == ["00000", "00001", "00002", "00004"]
    assert "bad input in 00003" in ledger.failures()["00003"]["error"]

    before = {s: r.finished_at for s, r in ledger.done().items()}
    with StageProgress(enabled=False) as progress:
        records = run_tasks(ledger, tasks, make_task(set()), label="t", progress=progress)
    after = {s: r.finished_at for s, r in ledger.done().items()}
    assert {s: after[s] for s in before} == before  # committed shards were not run again
    assert sorted(records) == [t.shard for t in tasks]
    assert ledger.failures() == {}
    assert sorted(ledger.done()) == [t.shard for t in tasks]


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
