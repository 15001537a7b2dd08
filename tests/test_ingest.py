"""Ingest planning: URL lists cut into input shards by tasks that stream row ranges."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config.data import IngestSection
from pipeline.engine.ledger import Attempt, Ledger
from pipeline.errors import InputError
from pipeline.stages import ingest
from pipeline.stages.ingest import list_tasks, split_list

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
