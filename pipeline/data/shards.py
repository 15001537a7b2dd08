"""Webdataset shards: read samples from a tar, write a tar deterministically.

A sample is a dict of member name → bytes plus `__key__`; in the tar each member is
`<key>.<member>` and a sample's members are adjacent (the webdataset convention).
Written tars have fixed metadata (mtime 0, uid/gid 0), so equal samples give equal bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline import storage

Sample = dict[str, bytes | str]


def _split(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, member = base.partition(".")
    prefix = name[: len(name) - len(base)]
    return prefix + key, member


def _check_end_marker(fs, path: str, url: str) -> None:
    # tarfile stops quietly when a tar is cut at a member boundary; a whole tar ends with two
    # zero blocks, so their absence means the file was truncated.
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size < 1024 or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"{url}: truncated tar (no end-of-archive marker)")


def iter_samples(url: str) -> Iterator[Sample]:
    """Samples of a tar shard in file order; raises tarfile.ReadError on a truncated tar."""
    fs, path = storage.get_fs(url)
    _check_end_marker(fs, path, url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        current: Sample | None = None
        for info in tar:
            if not info.isfile():
                continue
            key, member = _split(info.name)
            data = tar.extractfile(info).read()
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[member] = data
        if current is not None:
            yield current


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """A tar holding `samples` in the given order with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for member in sorted(m for m in sample if m != "__key__"):
                data = sample[member]
                data = data.encode() if isinstance(data, str) else data
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o444
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(url: str, samples: Iterable[Sample]) -> None:
    """Writes a tar shard (callers write to a temporary name and commit through the ledger)."""
    fs, path = storage.get_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(tar_bytes(samples))


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as `.npy` file bytes (the member format webdataset decodes to numpy)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
