"""fsspec helpers: every path in the pipeline is a URL (`/local/dir`, `s3://bucket/prefix`, ...).

Commits rely on two properties: on local disk `os.replace` is atomic, and on object stores a
single PUT is atomic (an object is either absent or whole). `write_atomic` uses whichever holds.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path inside it."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    fs, _ = get_fs(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def absolute(url: str) -> str:
    """Local paths made absolute (so Ray workers with another cwd agree); URLs unchanged."""
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(url)


def join(url: str, *parts: str) -> str:
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.join(rest, *parts)}"
    return os.path.join(url, *parts)


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def write_atomic(url: str, data: bytes) -> None:
    """Writes `data` so that readers see either nothing or all of it."""
    fs, path = get_fs(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def move(src: str, dst: str) -> None:
    """Moves a finished file to its final name (atomic rename on local disk)."""
    fs, src_path = get_fs(src)
    _, dst_path = get_fs(dst)
    if is_local(src):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.replace(src_path, dst_path)
    else:
        fs.mv(src_path, dst_path)


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def dumps(obj: Any) -> bytes:
    """Canonical JSON (sorted keys) so equal objects give equal bytes."""
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def write_json(url: str, obj: Any) -> None:
    write_atomic(url, dumps(obj))


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def read_json_or_none(url: str) -> Any:
    try:
        return read_json(url)
    except FileNotFoundError:
        return None


def list_names(url: str, suffix: str = "") -> list[str]:
    """Sorted base names of the files directly under `url` ending with `suffix`."""
    fs, path = get_fs(url)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    names = (posixpath.basename(e.rstrip("/")) for e in entries)
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)


def remove_tree(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def read_parquet(url: str):
    import pyarrow.parquet as pq

    fs, path = get_fs(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def write_parquet(url: str, table) -> None:
    """Writes a parquet file (not atomic by itself: callers commit through the ledger)."""
    import pyarrow.parquet as pq

    fs, path = get_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
