"""Ingest planning: URL lists cut into input shards by tasks that stream row ranges; the share of
rows that failed, against the recipe's thresholds, at the end of the stage and in its status."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline import storage
from pipeline.config.data import IngestSection
from pipeline.config.recipe import build_recipe
from pipeline.engine.ledger import Attempt, Ledger, ShardRecord
from pipeline.errors import InputError, StageFailed
from pipeline.stages import ingest
from pipeline.stages.base import FailedShare
from pipeline.stages.ingest import IngestStage, list_tasks, split_list
from pipeline.views.status import status_table

ROWS = 2_530
TABLE = pa.table(
    {"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(ROWS)], "caption": [f"c {i}" for i in range(ROWS)]}
)


def plan(tmp_path, url: str, rows: int | None, index: int = 2) -> dict[str, pa.Table]:
    cfg = IngestSection(url_lists=[url], shard_size=100)
    ledger = Ledger(str(tmp_path / "input"))
    shards = {}
    for task in list_tasks(url, index, rows, cfg.shard_size, digits=6):
        attempt = Attempt(ledger, task.shard, "f")
        record = attempt.commit(split_list(cfg, task, attempt))
        for name in record.files:
            shards[name.removesuffix(".parquet")] = storage.read_parquet(ledger.path(name))
    return dict(sorted(shards.items()))


def test_a_parquet_list_is_split_by_row_ranges_into_the_same_shards(tmp_path, monkeypatch):
    url = str(tmp_path / "urls.parquet")
    pq.write_table(TABLE, url, row_group_size=37)  # row groups across shard and task bounds
    monkeypatch.setattr(ingest, "LIST_ROWS_PER_TASK", 1_000)
    tasks = list_tasks(url, 2, ROWS, 100, digits=6)
    assert [(t.start, t.stop) for t in tasks] == [(0, 1000), (1000, 2000), (2000, 2530)]
    shards = plan(tmp_path / "a", url, ROWS)
    assert list(shards) == [f"{200000 + j}" for j in range(26)]
    assert [t.num_rows for t in shards.values()] == [100] * 25 + [30]
    assert pa.concat_tables(shards.values()).equals(TABLE)
    csv = str(tmp_path / "urls.csv")  # a CSV is one task, streamed, cut the same way
    pacsv.write_csv(TABLE, csv)
    assert len(list_tasks(csv, 2, None, 100, digits=6)) == 1
    assert {k: v.to_pydict() for k, v in plan(tmp_path / "b", csv, None).items()} == {
        k: v.to_pydict() for k, v in shards.items()
    }


def test_a_list_of_more_shards_than_its_numbers_is_refused(tmp_path):
    with pytest.raises(InputError, match="split the list or raise ingest.shard_size"):
        list_tasks("big.parquet", 0, ingest.LIST_STRIDE * 100 + 1, 100, digits=5)


def test_failed_share_names_the_top_reasons_and_the_highest_threshold_passed():
    failed = {"connection_error": 48, "http_4xx": 3, "timeout": 3, "decode_error": 1, "too_slow": 0}
    share = FailedShare("ingest", "ingest", 80, failed, warn=0.3, limit=None)
    assert (share.warns, share.fails) == (True, False)
    assert share.describe() == (
        "68.8% of 80 rows failed (connection_error 48, http_4xx 3, timeout 3, ...), above ingest.warn_failed_share 0.3"
    )
    assert (
        FailedShare("ingest", "ingest", 80, failed, warn=0.3, limit=0.6)
        .describe()
        .endswith("above ingest.max_failed_share 0.6")
    )
    for warn, limit in ((0.7, None), (None, None), (0.7, 0.9)):  # at or below: silent
        assert not FailedShare("ingest", "ingest", 80, failed, warn, limit).warns
    assert FailedShare("ingest", "ingest", 80, failed, None, 0.5).fails
    assert not FailedShare("ingest", "ingest", 0, {}, 0.0, 0.0).warns  # no rows, no share


def _ingest_stage(tmp_path, **thresholds) -> IngestStage:
    recipe = build_recipe({"name": "t", "output_dir": str(tmp_path), "ingest": {"url_lists": ["a"], **thresholds}})
    return IngestStage(recipe, str(tmp_path))


def test_a_stage_of_failed_downloads_warns_or_fails_in_one_line_and_says_so_in_its_status(tmp_path, caplog):
    stats = {"shards": 3, "samples_in": 60, "samples_out": 12, "counts": {"connection_error": 46, "http_4xx": 2}}
    with caplog.at_level(logging.WARNING):
        _ingest_stage(tmp_path).check_failed_share(stats)  # the default warns above 0.3
        _ingest_stage(tmp_path, warn_failed_share=None).check_failed_share(stats)
    assert [r.getMessage() for r in caplog.records] == [
        "ingest: 80.0% of 60 rows failed (connection_error 46, http_4xx 2), above ingest.warn_failed_share 0.3"
    ]
    with pytest.raises(StageFailed) as err:
        _ingest_stage(tmp_path, max_failed_share=0.5).check_failed_share(stats)
    assert str(err.value).startswith(
        "stage 'ingest': 80.0% of 60 rows failed (connection_error 46, http_4xx 2), above ingest.max_failed_share 0.5; "
        "its 3 shards stay committed"
    )
    _ingest_stage(tmp_path, max_failed_share=0.8).check_failed_share(stats)  # at the limit passes

    # the status, from the ledger alone: every shard committed, no `_done.json` (the stage failed)
    stage = _ingest_stage(tmp_path, max_failed_share=0.5)
    storage.write_json(stage.ledger.path("_fingerprint.json"), {"stage": "ingest"})
    stage.write_plan(3)
    for i in range(3):
        files = (f"{i:05d}.tar",)
        counts = {"connection_error": 16 - (i == 0) * 2, "http_4xx": (i == 0) * 2}
        stage.ledger.commit(ShardRecord(f"{i:05d}", 20, 4, files, "c", "f", counts))
    status = stage.status()
    assert status.state == "failed" and status.failures == 0
    assert status.warning == "ingest: " + str(err.value).removeprefix("stage 'ingest': ").split(";")[0]
    assert _ingest_stage(tmp_path, max_failed_share=0.9).status().state == "partial"
    relaxed = _ingest_stage(tmp_path, warn_failed_share=0.9).status()
    assert relaxed.state == "partial" and relaxed.warning is None
    console = Console(width=160, record=True)
    console.print(status_table([status]))
    assert f"  {status.warning}" in console.export_text()
