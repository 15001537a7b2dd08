"""ingest → filter → text-tokenizer end to end on the synthetic set over loopback (real Ray, real
img2dataset), checked against the set's ground truth, read back with webdataset and Ray Data,
and resumed after SIGKILLs in the middle of ingest and of filter."""

from __future__ import annotations

import collections
import json
import math

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import committed, compare_stage, dalle, free_port, kill_run_when, small_recipe

from pipeline import storage
from pipeline.engine.ledger import Ledger
from pipeline.models.bpe import TextTokenizer
from pipeline.stages.ingest import FAILURES

pytestmark = pytest.mark.slow

# What img2dataset makes of each defect kind the synthetic set labels "truncated": a JPEG cut to
# its first quarter does not decode.
INGEST_LABEL = {"truncated": "decode_error"}
# A slow server keeps ingest running long enough to be killed in the middle.
LATENCY_MS = 100


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, port):
    """One uninterrupted run: the ground truth for every resume test."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "out", port=port, latency_ms=LATENCY_MS)
    result = dalle("run", str(recipe), "--until", "text-tokenizer", "--no-progress")
    assert result.returncode == 0, result.stderr
    return tmp / "out", recipe


def _expected_by_key(out):
    """Ingest key → the synthetic set's expected fate of that URL-list row."""
    plan = json.loads((out / "ingest" / "_input" / "_plan.json").read_text())
    shard_size = pq.read_table(out / "ingest" / "_input" / f"{0:05d}.parquet").num_rows
    digits = math.ceil(math.log10(shard_size))
    expected = {}
    for row, label in enumerate(plan["expect"]):
        shard, index = divmod(row, shard_size)
        expected[f"{shard * 10**digits + index:0{5 + digits}d}"] = INGEST_LABEL.get(label, label)
    return expected


def test_every_row_is_accounted_for_and_matches_the_ground_truth(reference):
    out, _ = reference
    expected = _expected_by_key(out)
    ingest = json.loads((out / "ingest" / "_done.json").read_text())
    assert ingest["samples_in"] == len(expected)
    assert ingest["samples_out"] + sum(ingest["counts"].values()) == ingest["samples_in"]
    want = collections.Counter(v for v in expected.values() if v in FAILURES)
    assert {k: v for k, v in ingest["counts"].items() if v} == dict(want)

    raw = sorted(committed(out / "ingest"))
    files = sorted(p.stem for p in (out / "filter" / "_decisions").glob("*.parquet") if not p.name.startswith("kept-"))
    assert files == raw  # one decisions file per raw shard
    folder = out / "filter" / "_decisions"
    decisions = [d for name in raw for d in pq.read_table(folder / f"{name}.parquet").to_pylist()]
    got = {d["key"]: d["reason"] or "ok" for d in decisions}
    assert len(got) == ingest["samples_out"]
    wrong = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert wrong == {}
    dropped = collections.Counter(v for v in got.values() if v != "ok")
    filt = json.loads((out / "filter" / "_done.json").read_text())
    assert {k: v for k, v in filt["counts"].items() if v} == dict(dropped)
    assert len(dropped) == 8  # every filter rule fired on its planted defects


def test_filtered_shards_are_fixed_size_key_ordered_and_readable(reference):
    out, _ = reference
    filt = json.loads((out / "filter" / "_done.json").read_text())
    records = Ledger(str(out / "filter")).done()
    tars = [str(out / "filter" / r.files[0]) for r in records.values()]
    sizes = [r.samples_out for r in records.values()]
    assert all(n == 16 for n in sizes[:-1]) and 0 < sizes[-1] <= 16
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == filt["samples_out"]
    assert all({"jpg", "txt", "json"} <= set(s) for s in samples)
    manifest = pq.read_table(out / "filter" / records["00000"].files[1])
    assert manifest["key"].to_pylist() == keys[:16]

    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(tars).take_all()
    finally:
        ray.shutdown()
    assert sorted(r["__key__"] for r in rows) == keys


def test_tokenizer_is_trained_on_the_filtered_captions(reference):
    out, _ = reference
    tok = TextTokenizer.load(str(out / "text-tokenizer" / "tokenizer.json"), text_len=64)
    ids = tok.encode("A small RED circle on the left")
    assert tok.decode(ids).strip() == "a small red circle on the left"
    assert (ids != tok.pad_id).sum() <= 8  # frequent caption words are whole tokens


def test_status_reports_every_stage(reference):
    out, recipe = reference
    result = dalle("status", str(recipe), "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["stage"]: r for r in json.loads(result.stdout)}
    later = ["dvae", "clip", "encode", "train", "sample", "evaluate"]
    assert list(rows) == ["ingest", "filter", "text-tokenizer", *later]
    for name in ("ingest", "filter", "text-tokenizer"):
        row = rows[name]
        assert row["state"] == "complete" and row["shards_done"] == row["shards_total"] and row["failures"] == 0
    assert {rows[name]["state"] for name in later} == {"pending"}  # --until text-tokenizer
    assert rows["filter"]["output"] == str(out / "filter")
    assert rows["filter"]["counts"]["near_duplicate"] > 0
    table = dalle("status", str(recipe))
    assert "complete" in table.stdout and "near_duplicate" in table.stdout


def _ledger_count(path):
    return len(storage.list_names(str(path), ".json"))


def test_sigkill_in_ingest_and_in_filter_then_resume(tmp_path, reference, port):
    ref_out, _ = reference
    out = tmp_path / "out"
    recipe = small_recipe(tmp_path / "recipe.yaml", out, port=port, latency_ms=LATENCY_MS)
    args = ["run", str(recipe), "--until", "text-tokenizer", "--no-progress"]

    kill_run_when(args, lambda: _ledger_count(out / "ingest" / "_ledger") >= 2)
    partial = committed(out / "ingest")
    total = json.loads((out / "ingest" / "_plan.json").read_text())["shards"]
    assert 2 <= len(partial) < total and not (out / "ingest" / "_done.json").exists()

    kill_run_when(args, lambda: _ledger_count(out / "filter" / "_scan" / "_ledger") >= 1)
    assert (out / "ingest" / "_done.json").exists() and not (out / "filter" / "_done.json").exists()

    def in_dedup() -> bool:  # some dedup phase has committed a task
        return any(_ledger_count(p) for p in (out / "filter" / "_dedup").glob("*/_ledger"))

    kill_run_when(args, in_dedup)
    assert in_dedup() and not (out / "filter" / "_done.json").exists()

    result = dalle(*args)
    assert result.returncode == 0, result.stderr
    for stage in ("ingest", "filter"):
        diff = compare_stage(out / stage, ref_out / stage)
        assert diff["samples"] > 0
        assert {k: diff[k] for k in ("missing", "extra", "duplicate", "different")} == dict.fromkeys(
            ("missing", "extra", "duplicate", "different"), 0
        ), stage
    # filtered shards are byte-identical files, not only equal samples
    for name in committed(ref_out / "filter"):
        assert (out / "filter" / f"{name}.tar").read_bytes() == (ref_out / "filter" / f"{name}.tar").read_bytes()
    tok = (out / "text-tokenizer" / "tokenizer.json").read_bytes()
    assert tok == (ref_out / "text-tokenizer" / "tokenizer.json").read_bytes()


def test_rerun_of_a_finished_run_does_nothing_and_changed_config_is_refused(reference):
    out, recipe = reference
    before = {p: p.stat().st_mtime_ns for p in (out / "filter").glob("*.tar")}
    result = dalle("run", str(recipe), "--until", "text-tokenizer", "--no-progress", "-v")
    assert result.returncode == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "filter").glob("*.tar")} == before
    # every stage was complete: no Ray was started, and the summaries are the finished run's
    assert "nothing to run: ingest, filter, text-tokenizer complete" in result.stderr
    assert "started a Ray" not in result.stderr  # (a run with work says so: test_train_stage)
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["ingest", "filter", "text-tokenizer"]

    refused = dalle("run", str(recipe), "filter.min_caption_words=5", "--until", "text-tokenizer", "--no-progress")
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and "stage 'filter'" in line and "config.min_caption_words: 3 -> 5" in line
    assert {p: p.stat().st_mtime_ns for p in (out / "filter").glob("*.tar")} == before


def test_force_redoes_a_stage_and_downstream_and_until_stops(reference):
    out, recipe = reference
    ingest_mtime = (out / "ingest" / "_done.json").stat().st_mtime_ns
    tok_before = (out / "text-tokenizer" / "tokenizer.json").read_bytes()
    result = dalle("run", str(recipe), "--force", "filter", "--until", "filter", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (out / "ingest" / "_done.json").stat().st_mtime_ns == ingest_mtime
    assert (out / "filter" / "_done.json").exists()
    assert not (out / "text-tokenizer").exists()  # cleared as downstream of filter, not rerun
    result = dalle("run", str(recipe), "--until", "text-tokenizer", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert (out / "text-tokenizer" / "tokenizer.json").read_bytes() == tok_before
