"""URL lists as users bring them (CC3M/CC12M/LAION parquet, csv, tsv): checked, identified, read.

The driver only checks and identifies a list (a few requests each, whatever its size, and a hash
once: a rerun trusts the recorded hash while the size and ETag/mtime are unchanged); the ingest
stage's planning tasks read the rows, one task per list. Everything here raises `InputError`
with one line naming the file and what is wrong.
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


def _csv_parse(fmt: str) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)


def _read(url: str) -> pa.Table:
    fmt = list_format(url)
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise InputError(f"ingest.url_lists: {url}: file not found")
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                return pq.read_table(f)
        with fs.open(path, "rb", compression="infer") as f:
            return pacsv.read_csv(
                f,
                parse_options=_csv_parse(fmt),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False),
            )
    except (pa.ArrowInvalid, OSError) as err:
        if "Empty CSV file" in str(err):
            raise InputError(f"ingest.url_lists: {url}: no rows") from None
        raise InputError(f"ingest.url_lists: {url}: cannot read as {fmt}: {one_line(err, typed=False)}") from None


def _columns(url: str, names: list[str], url_col: str, caption_col: str, extra_cols: tuple[str, ...]) -> None:
    for role, col in [("url_col", url_col), ("caption_col", caption_col)] + [("extra_cols", c) for c in extra_cols]:
        if col not in names:
            raise InputError(f"ingest.url_lists: {url}: no column '{col}' (ingest.{role}; columns: {', '.join(names)})")


def check_url_list(url: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...] = ()) -> None:
    """Format, columns and at least one row, from the parquet footer or the first block of a CSV:
    a few requests whatever the list's size (the rows are read by the planning tasks)."""
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


def read_url_list(url: str, url_col: str, caption_col: str, extra_cols: tuple[str, ...] = ()) -> pa.Table:
    """The list's rows as a table with columns `url`, `caption` and the extra columns (strings)."""
    table = _read(url)
    _columns(url, table.column_names, url_col, caption_col, extra_cols)
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
    """Checks every list (`check_url_list`) and returns {absolute url: {sha256, size, tag}};
    writes nothing. A list whose size and tag equal those `recorded` at planning keeps its recorded
    sha256; any other is hashed again (so a changed list gets a new digest and is refused)."""
    identity = {}
    for url in urls:
        check_url_list(url, url_col, caption_col, extra_cols)
        key = storage.absolute(url)
        now = file_identity(url)
        old = (recorded or {}).get(key)
        digest = old["sha256"] if old and {k: old.get(k) for k in now} == now else content_digest(url)
        identity[key] = {"sha256": digest, **now}
    return identity


def shard_table(table: pa.Table, shard_size: int) -> list[pa.Table]:
    return [table.slice(start, shard_size) for start in range(0, table.num_rows, shard_size)]
