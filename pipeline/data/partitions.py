"""Partitioned parquet files: the exchange format of a hash shuffle done with files.

A task that routes rows to `parts` partitions writes ONE file, sorted by partition, with one row
group per non-empty partition; the task of partition p then reads only the row groups of p from
every such file (found from the footers' statistics). So a shuffle of M senders and P receivers
costs M files and M x P small range reads, not M x P objects, and every read is parallel.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

PART = "part"
"""The column naming each row's partition (int64)."""


def write_partitioned(url: str, table: pa.Table, part: np.ndarray) -> None:
    """Writes `table` to `url` with the column `part` added: rows sorted by it (stable, so each
    partition keeps the table's order) and one row group per partition."""
    part = np.asarray(part, dtype=np.int64)
    order = np.argsort(part, kind="stable")
    part = part[order]
    table = table.take(pa.array(order)).append_column(PART, pa.array(part))
    bounds = np.flatnonzero(np.diff(part)) + 1
    starts = np.concatenate([[0], bounds]) if len(part) else np.array([], dtype=np.int64)
    ends = np.concatenate([bounds, [len(part)]]) if len(part) else np.array([], dtype=np.int64)
    fs, path = storage.get_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, table.schema) as writer:
        if not len(part):
            writer.write_table(table)
        for start, end in zip(starts, ends):
            writer.write_table(table.slice(int(start), int(end - start)), row_group_size=int(end - start))


def _read_one(url: str, part: int, columns: list[str] | None) -> pa.Table | None:
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        index = parquet.schema_arrow.get_field_index(PART)
        groups = []
        for i in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(i).column(index).statistics
            if stats is not None and stats.has_min_max and stats.min <= part <= stats.max:
                groups.append(i)
        if not groups:
            return None
        return parquet.read_row_groups(groups, columns=columns)


def read_partition(urls: list[str], part: int, columns: list[str] | None = None, threads: int = 16) -> pa.Table | None:
    """The rows of partition `part` from every file of `urls` (in `urls` order), or None when no
    file holds any. `columns` defaults to all, the partition column included."""
    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        pieces = [t for t in pool.map(lambda u: _read_one(u, part, columns), urls) if t is not None]
    return pa.concat_tables(pieces) if pieces else None
