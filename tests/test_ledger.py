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


def test_forget_takes_shards_out_of_a_compacted_ledger_with_their_files(tmp_path):
    ledger = Ledger(str(tmp_path))
    for shard in ("00000", "00001", "00002"):
        (tmp_path / f"{shard}.tar").write_bytes(b"tar")
        ledger.commit(record(shard))
    ledger.compact(ledger.done(), total=3)
    (tmp_path / "_done.json").write_text("{}")
    ledger.forget(["00001", "00002"])
    assert list(ledger.done()) == ["00000"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["00000.tar"]
    assert not (tmp_path / "_done.json").exists()  # the stage runs again, for the forgotten shards only
    ledger.forget(["00001"])  # already gone: nothing to do
    assert list(ledger.done()) == ["00000"]


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


def test_a_fingerprint_written_before_a_field_existed_reads_as_its_old_value(tmp_path):
    ledger = Ledger(str(tmp_path))
    older = Fingerprint("dvae", {"n_hid": 32, "train": {"lr": 1.0}}, {"upstream": {"filter": "abc"}})
    ledger.claim(older, "dvae")
    added = {"noise_end": 1.0, "train.warmup": "linear"}
    config = {"n_hid": 32, "noise_end": 1.0, "train": {"lr": 1.0, "warmup": "linear"}}
    now = Fingerprint("dvae", config, older.inputs, added)
    assert now.digest != older.digest
    kept = ledger.check(now, "dvae")  # the folder's own fingerprint, so its digest is the one recorded downstream
    assert kept.as_dict() == older.as_dict() and kept.digest == older.digest and kept.added == added
    assert ledger.claim(kept, "dvae").digest == older.digest
    changed = Fingerprint("dvae", {**now.config, "train": {"lr": 1.0, "warmup": "cosine"}}, older.inputs, added)
    with pytest.raises(FingerprintMismatch, match=r"\(config.train.warmup: 'linear' -> 'cosine'\); use --force dvae"):
        ledger.check(changed, "dvae")
    undeclared = Fingerprint("dvae", now.config, older.inputs, {"train.warmup": "linear"})
    with pytest.raises(FingerprintMismatch, match=r"\(config.noise_end: None -> 1.0\)"):
        ledger.check(undeclared, "dvae")
    assert json.loads((tmp_path / "_fingerprint.json").read_text()) == older.as_dict()


def test_a_section_added_whole_is_filled_before_the_fields_added_to_it_later():
    fp = Fingerprint("s", {}, added={"ema.start": 0, "ema": {"decay": 0.9}, "absent.x": 1})
    read, filled = fp.read({"config": {"lr": 1}})
    assert read == {"config": {"lr": 1, "ema": {"decay": 0.9, "start": 0}}} and filled == ["ema", "ema.start"]


def test_a_field_that_became_execution_only_is_left_out_of_a_stored_fingerprint(tmp_path):
    """A folder written while `train.workers` still counted resumes under the release that made it
    a how-it-runs field, whatever it held; the folder keeps its own fingerprint and digest."""
    ledger = Ledger(str(tmp_path))
    older = Fingerprint("dvae", {"n_hid": 32, "train": {"lr": 1.0, "workers": 8}}, {"upstream": {}})
    ledger.claim(older, "dvae")
    now = Fingerprint("dvae", {"n_hid": 32, "train": {"lr": 1.0}}, older.inputs, dropped=frozenset({"train.workers"}))
    kept = ledger.check(now, "dvae")
    assert kept.digest == older.digest and kept.dropped == now.dropped
    changed = Fingerprint("dvae", {"n_hid": 64, "train": {"lr": 1.0}}, older.inputs, dropped=now.dropped)
    with pytest.raises(FingerprintMismatch, match=r"config.n_hid: 32 -> 64"):
        ledger.check(changed, "dvae")


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


# -- the summary -----------------------------------------------------------------------------------
def _counting(monkeypatch):
    """Counts the listings and single reads the ledger makes (batched reads count once)."""
    calls = {"list": 0, "read": 0, "batch": 0}
    for name, key in (("list_names", "list"), ("read_bytes", "read"), ("read_many", "batch")):
        real = getattr(storage, name)
        monkeypatch.setattr(
            storage,
            name,
            lambda *a, _real=real, _key=key, **kw: calls.__setitem__(_key, calls[_key] + 1) or _real(*a, **kw),
        )
    return calls


def test_a_complete_summary_is_read_in_one_request(tmp_path, monkeypatch):
    ledger = Ledger(str(tmp_path))
    for i in range(50):
        ledger.commit(record(f"{i:05d}", finished_at=1000.0 + i))
    want = ledger.done()
    ledger.compact(dict(reversed(want.items())), total=50)  # as the driver holds them: in commit order
    calls = _counting(monkeypatch)
    assert list(ledger.done().items()) == list(want.items())  # in shard order
    assert calls == {"list": 0, "read": 1, "batch": 0}


def test_a_stale_summary_is_completed_from_the_newer_records_in_one_batch(tmp_path, monkeypatch):
    ledger = Ledger(str(tmp_path))
    for i in range(10):
        ledger.commit(record(f"{i:05d}", finished_at=1000.0 + i))
    ledger.compact(ledger.done(), total=30)  # compacted while the run was at 10 of 30
    for i in range(10, 25):
        ledger.commit(record(f"{i:05d}", finished_at=1000.0 + i))
    calls = _counting(monkeypatch)
    done = ledger.done()
    assert sorted(done) == [f"{i:05d}" for i in range(25)] and done["00024"].finished_at == 1024.0
    assert calls == {"list": 1, "read": 1, "batch": 1}


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_missing_or_unreadable_summary_changes_nothing(tmp_path, damage):
    ledger = Ledger(str(tmp_path))
    for i in range(5):
        ledger.commit(record(f"{i:05d}", counts={"kept": i}))
    want = ledger.done()
    ledger.compact(want, total=5)
    summary = tmp_path / "_ledger" / "_summary.parquet"
    summary.unlink() if damage == "deleted" else summary.write_bytes(b"not parquet")
    assert ledger.done() == want


def test_status_is_right_with_a_stale_or_deleted_summary(tmp_path):
    from pipeline.config.recipe import build_recipe
    from pipeline.stages.ingest import IngestStage

    recipe = build_recipe({"name": "t", "output_dir": str(tmp_path), "ingest": {"url_lists": ["a.parquet"]}})
    stage = IngestStage(recipe, str(tmp_path))
    assert stage.status().state == "pending"
    storage.write_json(stage.ledger.path("_fingerprint.json"), {"stage": "ingest"})
    storage.write_json(stage.ledger.path("_plan.json"), {"shards": 6})
    for i in range(3):
        stage.ledger.commit(record(f"{i:05d}", counts={"http_4xx": 1}))
    stage.ledger.compact(stage.ledger.done(), total=6)
    for i in range(3, 5):  # committed after the summary was written
        stage.ledger.commit(record(f"{i:05d}", counts={"http_4xx": 1}))
    stale = stage.status()
    assert (stale.state, stale.shards_done, stale.shards_total, stale.samples_out) == ("partial", 5, 6, 40)
    assert stale.counts == {"http_4xx": 5}
    (tmp_path / "ingest" / "_ledger" / "_summary.parquet").unlink()
    assert stage.status() == stale
