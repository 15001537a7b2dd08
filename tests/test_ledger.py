"""The ledger: commit, skip, failures, fingerprint refusal."""

import json

import pytest

from pipeline import storage
from pipeline.engine.ledger import Fingerprint, Ledger, ShardRecord, checksum_files, describe_change
from pipeline.errors import FingerprintMismatch, SchemaError


def record(shard="00000", **kw):
    base = dict(
        shard=shard,
        samples_in=10,
        samples_out=8,
        files=(f"{shard}.tar",),
        checksum="c",
        fingerprint="f",
        counts={"http_4xx": 2},
    )
    return ShardRecord(**{**base, **kw})


def test_commit_makes_a_shard_done(tmp_path):
    ledger = Ledger(str(tmp_path / "stage"))
    assert ledger.done() == {}
    ledger.commit(record("00001"))
    ledger.commit(record("00000"))
    done = ledger.done()
    assert list(done) == ["00000", "00001"]
    assert done["00000"].samples_out == 8 and done["00000"].counts == {"http_4xx": 2}
    assert done["00000"].finished_at > 0


def test_unfinished_writes_are_not_records(tmp_path):
    ledger = Ledger(str(tmp_path))
    (tmp_path / "_ledger").mkdir()
    (tmp_path / "_ledger" / "00003.json.tmp-abcd").write_text("{half")
    assert ledger.done() == {}


def test_commit_clears_the_shards_failure(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.record_failure("00000", "boom")
    assert ledger.failures()["00000"]["error"] == "boom"
    ledger.commit(record("00000"))
    assert ledger.failures() == {}


def test_a_record_that_breaks_the_schema_is_refused(tmp_path):
    ledger = Ledger(str(tmp_path))
    with pytest.raises(SchemaError, match="ledger record 00000"):
        ledger.commit(record(counts={"x": "many"}))
    assert ledger.done() == {}


def test_fingerprint_refusal_names_what_changed(tmp_path):
    ledger = Ledger(str(tmp_path))
    old = Fingerprint("filter", {"shard_size": 100, "languages": ["en"]}, {"upstream": {"ingest": "abc"}})
    ledger.claim(old, "filter")
    ledger.claim(old, "filter")  # same fingerprint: fine, twice
    new = Fingerprint("filter", {"shard_size": 200, "languages": ["en"]}, {"upstream": {"ingest": "abc"}})
    with pytest.raises(FingerprintMismatch) as info:
        ledger.check(new, "filter")
    msg = str(info.value)
    assert "stage 'filter'" in msg and "config.shard_size: 100 -> 200" in msg and "--force filter" in msg
    assert json.loads((tmp_path / "_fingerprint.json").read_text())["config"]["shard_size"] == 100


def test_shards_without_a_fingerprint_are_refused(tmp_path):
    ledger = Ledger(str(tmp_path))
    ledger.commit(record())
    with pytest.raises(FingerprintMismatch, match="no _fingerprint.json"):
        ledger.check(Fingerprint("ingest", {}), "ingest")


def test_digest_depends_on_every_part():
    a = Fingerprint("s", {"x": 1}, {"upstream": {"u": "1"}})
    assert a.digest == Fingerprint("s", {"x": 1}, {"upstream": {"u": "1"}}).digest
    assert a.digest != Fingerprint("s", {"x": 2}, {"upstream": {"u": "1"}}).digest
    assert a.digest != Fingerprint("s", {"x": 1}, {"upstream": {"u": "2"}}).digest


def test_describe_change_lists_nested_keys():
    text = describe_change({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4})
    assert text == "a.c: 2 -> 3; d: None -> 4"


def test_checksum_covers_file_order(tmp_path):
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"2")
    ab = checksum_files([str(tmp_path / "a"), str(tmp_path / "b")])
    assert ab != checksum_files([str(tmp_path / "b"), str(tmp_path / "a")])
    storage.write_atomic(str(tmp_path / "a"), b"1")
    assert ab == checksum_files([str(tmp_path / "a"), str(tmp_path / "b")])
