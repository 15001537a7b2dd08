"""Tar shards: round trip, deterministic bytes, webdataset compatibility, truncation is loud."""

import tarfile

import pytest
import webdataset as wds

from pipeline.data.shards import iter_samples, tar_bytes, write_tar

SAMPLES = [{"__key__": f"{i:09d}", "jpg": bytes([i]) * 50, "txt": f"caption {i}", "json": b"{}"} for i in range(5)]


def test_round_trip_keeps_order_and_bytes(tmp_path):
    write_tar(str(tmp_path / "a.tar"), SAMPLES)
    back = list(iter_samples(str(tmp_path / "a.tar")))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in SAMPLES]
    assert back[3]["jpg"] == SAMPLES[3]["jpg"] and back[3]["txt"] == b"caption 3"


def test_equal_samples_give_equal_bytes():
    assert tar_bytes(SAMPLES) == tar_bytes([dict(s) for s in SAMPLES])
    assert tar_bytes(SAMPLES) != tar_bytes(SAMPLES[::-1])


def test_plain_webdataset_reads_it(tmp_path):
    write_tar(str(tmp_path / "a.tar"), SAMPLES)
    got = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in SAMPLES]
    assert got[0]["txt"] == b"caption 0"


def test_truncated_tar_raises(tmp_path):
    data = tar_bytes(SAMPLES)
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(tarfile.ReadError):
        list(iter_samples(str(tmp_path / "t.tar")))
