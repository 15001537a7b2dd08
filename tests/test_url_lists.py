"""URL lists: checked from their footer or first block, identified without re-reading them."""

from __future__ import annotations

import gzip
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.data import url_lists
from pipeline.data.url_lists import check_url_list, inspect_url_lists, read_url_list
from pipeline.errors import InputError

ROWS = {"url": [f"http://127.0.0.1:9/{i}.jpg" for i in range(50)], "caption": [f"a red circle {i}" for i in range(50)]}


def write(path, fmt: str):
    table = pa.table(ROWS)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "tsv.gz":
        with gzip.open(path, "wb") as f:
            pacsv.write_csv(table, f, pacsv.WriteOptions(delimiter="\t"))
    else:
        pacsv.write_csv(table, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv.gz"])
def test_formats_are_checked_and_read(tmp_path, fmt):
    url = write(tmp_path / f"urls.{fmt}", fmt)
    check_url_list(url, "url", "caption")
    assert read_url_list(url, "url", "caption").to_pydict() == ROWS


def test_check_reads_only_the_first_block_of_a_csv(tmp_path):
    path = tmp_path / "big.csv"
    good = "".join(f"http://127.0.0.1:9/{i}.jpg,a caption number {i}\n" for i in range(100_000))
    path.write_text("url,caption\n" + good + "x,y,z\n")  # a broken row only at the end (4 MB on)
    check_url_list(str(path), "url", "caption")
    with pytest.raises(InputError, match="cannot read as csv"):
        read_url_list(str(path), "url", "caption")


@pytest.mark.parametrize(
    "content, fragment",
    [("url,caption\n", "no rows"), ("", "no rows"), ("url,text\nhttp://x/a.jpg,a\n", "no column 'caption'")],
)
def test_check_refuses_with_one_line(tmp_path, content, fragment):
    path = tmp_path / "urls.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=fragment) as err:
        check_url_list(str(path), "url", "caption")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_recorded_identity_spares_the_hash_and_a_change_is_still_seen(tmp_path, monkeypatch):
    url = write(tmp_path / "urls.parquet", "parquet")
    first = inspect_url_lists((url,), "url", "caption", ())
    (ident,) = first.values()
    assert set(ident) == {"sha256", "size", "tag", "rows"} and ident["rows"] == 50

    def no_hash(u):
        raise AssertionError("hashed again")

    with monkeypatch.context() as m:  # unchanged: the recorded digest, no read of the content
        m.setattr(url_lists, "content_digest", no_hash)
        assert inspect_url_lists((url,), "url", "caption", (), recorded=first) == first
    stat = os.stat(url)
    os.utime(url, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes
    touched = inspect_url_lists((url,), "url", "caption", (), recorded=first)
    assert touched[next(iter(touched))]["sha256"] == ident["sha256"]
    pq.write_table(pa.table({**ROWS, "caption": [c.upper() for c in ROWS["caption"]]}), url)  # changed
    changed = inspect_url_lists((url,), "url", "caption", (), recorded=first)
    assert changed[next(iter(changed))]["sha256"] != ident["sha256"]
