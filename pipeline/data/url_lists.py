"""URL lists as users bring them (CC3M/CC12M/LAION parquet, csv, tsv): checked, identified, read.

The driver only checks and identifies a list (a few requests each, whatever its size, and a hash
once: a rerun trusts the recorded hash while the size and ETag/mtime are unchanged); the ingest
stage's planning tasks read the rows, one task per list. Everything here raises `InputError`
with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

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


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def _columns(url: str, names: list[str], url_col: str, caption_col: str, extra_cols: tuple[str, ...]) -> None:
    for role, col in [("url_col", url_col), ("caption_col", caption_col)] + [("extra_cols", c) for c in extra_cols]:
        if col not in names:
            raise InputError(f"ingest.url_lists: {url}: no column '{col}' (ingest.{role}; columns: {', '.join(names)})")


def check_url_list(url: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...] = ()) -> int | None:
    """Format, columns and at least one row, from the parquet footer or the first block of a CSV:
    a few requests whatever the list's size (the rows are read by the planning tasks). Returns a
    parquet list's row count (None for a CSV: unknown until it is read)."""
    fmt = list_format(url)
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise InputError(f"ingest.url_lists: {url}: file not found")
    try:
        with fs.open(path, "rb", compression=None if fmt == "parquet" else "infer") as f:
            if fmt == "parquet":
                parquet = pq.ParquetFile(f)
                names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
            else:
                reader = pacsv.open_csv(
                    f,
                    read_options=pacsv.ReadOptions(block_size=1 << 20),
                    parse_options=_csv_parse(fmt),
                    convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
                )
                names = reader.schema.names
                rows = next((b.num_rows for b in reader if b.num_rows), 0)
    except (pa.ArrowInvalid, OSError) as err:
        if "Empty CSV file" in str(err):
            raise InputError(f"ingest.url_lists: {url}: no rows") from None
        raise InputError(f"ingest.url_lists: {url}: cannot read as {fmt}: {one_line(err, typed=False)}") from None
    _columns(url, names, url_col, caption_col, extra_cols)
    if not rows:
        raise InputError(f"ingest.url_lists: {url}: no rows")
    return parquet.metadata.num_rows if fmt == "parquet" else None


def _batches(fmt: str, f, start: int, stop: int | None) -> tuple[int, Iterator[pa.RecordBatch]]:
    """The number of the first row they hold, and the batches: a CSV's from its start, a parquet
    file's from the row groups holding rows [start, stop)."""
    if fmt != "parquet":
        reader = pacsv.open_csv(
            f,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=_csv_parse(fmt),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
        )
        return 0, iter(reader)
    parquet = pq.ParquetFile(f)
    groups, first, at = [], None, 0
    for i in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(i).num_rows
        if at + n > start and (stop is None or at < stop):
            groups.append(i)
            first = at if first is None else first
        at += n
    if not groups:
        return at, iter(())
    return first, parquet.iter_batches(batch_size=65_536, row_groups=groups)


def iter_url_list(
    url: str,
    url_col: str,
    caption_col: str,
    extra_cols: tuple[str, ...] = (),
    start: int = 0,
    stop: int | None = None,
) -> Iterator[pa.Table]:
    """The list's rows [start, stop) as tables with columns `url`, `caption` and the extra columns
    (strings), streamed: memory stays one batch whatever the list's size. A parquet list reads only
    the row groups holding those rows; a CSV is read from its start (`start` must be 0)."""
    fmt = list_format(url)
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise InputError(f"ingest.url_lists: {url}: file not found")
    if fmt != "parquet" and (start or stop is not None):
        raise ValueError("a CSV list is read whole")
    try:
        with fs.open(path, "rb", compression=None if fmt == "parquet" else "infer") as f:
            at, batches = _batches(fmt, f, start, stop)
            for batch in batches:
                _columns(url, batch.schema.names, url_col, caption_col, extra_cols)
                lo, hi = max(start - at, 0), batch.num_rows if stop is None else min(stop - at, batch.num_rows)
                at += batch.num_rows
                if hi > lo:
                    table = pa.Table.from_batches([batch.slice(lo, hi - lo)])
                    names = {"url": url_col, "caption": caption_col, **{c: c for c in extra_cols}}
                    yield pa.table({name: table[col].cast(pa.string()) for name, col in names.items()})
                if stop is not None and at >= stop:
                    return
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"ingest.url_lists: {url}: cannot read as {fmt}: {one_line(err, typed=False)}") from None


def read_url_list(url: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...] = ()) -> pa.Table:
    """The whole list as one table (`iter_url_list`'s batches concatenated; small lists only)."""
    tables = list(iter_url_list(url, url_col, caption_col, extra_cols))
    if not tables:
        raise InputError(f"ingest.url_lists: {url}: no rows")
    return pa.concat_tables(tables)


def content_digest(url: str) -> str:
    """sha256 of the file's bytes: a changed list is a different input."""
    fs, path = storage.get_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(url: str) -> dict:
    """What says a file is unchanged without reading it: its size and its ETag (object stores) or
    modification time (local and other filesystems)."""
    fs, path = storage.get_fs(url)
    info = fs.info(path)
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return {"size": info.get("size"), "tag": str(tag)}


def inspect_url_lists(
    urls: tuple[str, ...], url_col: str, caption_col: str, extra_cols: tuple[str, ...], recorded: dict | None = None
) -> dict[str, dict]:
    """Checks every list (`check_url_list`) and returns {absolute url: {sha256, size, tag, rows}};
    writes nothing. A list whose size and tag equal those `recorded` at planning keeps its recorded
    sha256; any other is hashed again (so a changed list gets a new digest and is refused)."""
    identity = {}
    for url in urls:
        rows = check_url_list(url, url_col, caption_col, extra_cols)
        key = storage.absolute(url)
        now = file_identity(url)
        old = (recorded or {}).get(key)
        digest = old["sha256"] if old and {k: old.get(k) for k in now} == now else content_digest(url)
        identity[key] = {"sha256": digest, **now, "rows": rows}
    return identity


def shard_table(table: pa.Table, shard_size: int) -> list[pa.Table]:
    return [table.slice(start, shard_size) for start in range(0, table.num_rows, shard_size)]
