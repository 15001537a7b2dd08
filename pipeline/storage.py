"""fsspec helpers: every path in the pipeline is a URL (`/local/dir`, `s3://bucket/prefix`, ...).

Commits rely on two properties: on local disk `os.replace` is atomic, and on object stores a
single PUT is atomic (an object is either absent or whole). `write_atomic` uses whichever holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` and the path inside it.

    Object-store listings are never cached: Ray workers commit into the folders the driver
    reads, and a listing cached before their commit would hide it (s3fs answers `exists`,
    `info` and `open` from a cached listing of the parent folder)."""
    return fsspec.core.url_to_fs(url, use_listings_cache=False)


# Exception names of the object-store clients (botocore, aiohttp, gcsfs) for an endpoint that
# does not answer; matched by name along the cause chain, so no client library must be imported
UNREACHABLE = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError"}
)


def unreachable(err: BaseException) -> BaseException | None:
    """The error in `err`'s cause chain saying that an object store did not answer, or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if any(cls.__name__ in UNREACHABLE for cls in type(err).__mro__):
            return err
        err = err.__cause__ or err.__context__
    return None


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
    """The whole file, in one request on object stores: a file opened for reading is fetched in
    ranges pinned to its ETag, which fails when a writer replaces the object meanwhile (progress
    files and metrics are replaced while the driver and `dalle status` read them)."""
    fs, path = get_fs(url)
    return fs.cat_file(path, **_one_request(fs))


def _one_request(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    # s3fs sizes a whole-file read with a HEAD first (to split it into concurrent ranges), and a
    # HEAD that misses costs a listing too: small files are read with one GET instead
    return {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}


def read_many(urls: list[str]) -> dict[str, bytes]:
    """url -> bytes of each file of `urls` that exists, fetched in one batched call (concurrent
    requests on object stores), never one blocking GET after another. All on one filesystem."""
    if not urls:
        return {}
    fs, _ = get_fs(urls[0])
    paths = {get_fs(u)[1]: u for u in urls}
    got = fs.cat(list(paths), on_error="omit", **_one_request(fs))
    return {paths[p]: data for p, data in got.items() if p in paths}


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


def upload_folder(local: str, url: str) -> None:
    """Copies every file under the local folder `local` to `url`, keeping relative paths."""
    fs, root = get_fs(url)
    sources, targets = [], []
    for folder, _, names in os.walk(local):
        for path in (os.path.join(folder, name) for name in names):
            if os.path.isfile(path):  # not sockets or dangling links
                sources.append(path)
                targets.append(posixpath.join(root, os.path.relpath(path, local).replace(os.sep, "/")))
    for parent in sorted({posixpath.dirname(t) for t in targets}):
        fs.makedirs(parent, exist_ok=True)
    if sources:
        fs.put(sources, targets)


def download_folder(url: str, local: str, files: list[str] | None = None) -> None:
    """Copies every file under `url` (or only `files`, paths relative to it) into the local folder
    `local`, keeping relative paths."""
    fs, root = get_fs(url)
    root = root.rstrip("/")
    if files is None:
        # keys ending in "/" are folder markers (pyarrow's S3 filesystem, so Ray Train, writes them)
        sources = [p for p in fs.find(root) if not p.endswith("/")]
    else:
        sources = [posixpath.join(root, f) for f in files]
    targets = [os.path.join(local, *posixpath.relpath(p, root).split("/")) for p in sources]
    for parent in {os.path.dirname(t) for t in targets}:
        os.makedirs(parent, exist_ok=True)
    if sources:
        fs.get(sources, targets)


def file_sizes(url: str) -> dict[str, int]:
    """Relative path -> size of every file under `url`, from one recursive listing (a few requests
    on object stores, whatever the file count)."""
    fs, root = get_fs(url)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.relpath(p, root): int(info["size"]) for p, info in found.items() if not p.endswith("/")}


@contextlib.contextmanager
def local_copy(url: str, files: list[str] | None = None) -> Iterator[str]:
    """A local folder holding the files under `url` (or only `files`, relative to it), for libraries
    that read only local disk: the folder itself when it is local, else a temporary download
    (removed on exit)."""
    if is_local(url):
        yield get_fs(url)[1]
        return
    with tempfile.TemporaryDirectory(prefix="download-") as tmp:
        download_folder(url, tmp, files)
        yield tmp


@contextlib.contextmanager
def local_staging(url: str) -> Iterator[str]:
    """A local folder whose files end up under `url`, for libraries that write only local disk:
    the folder itself when it is local, else a temporary one uploaded when the block succeeds."""
    if is_local(url):
        path = get_fs(url)[1]
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="upload-") as tmp:
        yield tmp
        upload_folder(tmp, url)


def remove(url: str) -> None:
    """Deletes one file; a missing one is not an error."""
    fs, path = get_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def read_parquet(url: str):
    """Reads a whole parquet file in one request. pyarrow is handed the bytes, never a Python file
    object: its read-ahead threads calling back into Python abort the interpreter at exit now and
    then ("terminate called without an active exception", apache/arrow#34314)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(url)))


def write_parquet(url: str, table) -> None:
    """Writes a parquet file (not atomic by itself: callers commit through the ledger)."""
    import pyarrow.parquet as pq

    fs, path = get_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)
