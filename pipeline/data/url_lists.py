"""URL lists as users bring them (CC3M/CC12M/LAION parquet, csv, tsv): checked, identified, read.

Everything here raises `InputError` with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError, one_line

FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".csv.gz": "csv", ".tsv.gz": "tsv"}


def list_format(url: str) -> str:
    for suffix, fmt in FORMATS.items():
        if url.lower().endswith(suffix):
            return fmt
    raise InputError(f"ingest.url_lists: {url}: unknown format (expected {', '.join(FORMATS)})")


def _read(url: str) -> pa.Table:
    fmt = list_format(url)
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise InputError(f"ingest.url_lists: {url}: file not found")
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_table(f)
        delimiter = "\t" if fmt == "tsv" else ","
        with fs.open(path, "rb", compression="infer") as f:
            return pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
    except (pa.ArrowInvalid, OSError) as err:
        if "Empty CSV file" in str(err):
            raise InputError(f"ingest.url_lists: {url}: no rows") from None
        raise InputError(f"ingest.url_lists: {url}: cannot read as {fmt}: {one_line(err, typed=False)}") from None


def read_url_list(url: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...] = ()) -> pa.Table:
    """The list's rows as a table with columns `url`, `caption` and the extra columns (strings)."""
    table = _read(url)
    for role, col in [("url_col", url_col), ("caption_col", caption_col)] + [("extra_cols", c) for c in extra_cols]:
        if col not in table.column_names:
            have = ", ".join(table.column_names)
            raise InputError(f"ingest.url_lists: {url}: no column '{col}' (ingest.{role}; columns: {have})")
    if table.num_rows == 0:
        raise InputError(f"ingest.url_lists: {url}: no rows")
    columns = {"url": table[url_col], "caption": table[caption_col], **{c: table[c] for c in extra_cols}}
    return pa.table({name: col.cast(pa.string()) for name, col in columns.items()})


def content_digest(url: str) -> str:
    """sha256 of the file's bytes: a changed list is a different input."""
    fs, path = storage.get_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def inspect_url_lists(urls: tuple[str, ...], url_col: str, caption_col: str, extra_cols: tuple[str, ...]) -> dict:
    """Checks every list (format, columns, rows) and returns {url: digest}; writes nothing."""
    identity = {}
    for url in urls:
        read_url_list(url, url_col, caption_col, extra_cols)
        identity[storage.absolute(url)] = content_digest(url)
    return identity


def shard_table(table: pa.Table, shard_size: int) -> list[pa.Table]:
    return [table.slice(start, shard_size) for start in range(0, table.num_rows, shard_size)]
