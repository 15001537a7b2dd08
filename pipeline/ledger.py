"""The ledger: the manifest of a stage's finished shards, kept beside its output.

Layout under a stage folder `<output_dir>/<stage>/`:

    _fingerprint.json       what the output was made from (stage config + inputs); written first
    _ledger/<shard>.json    one record per committed shard; written last, it IS the commit
    _failures/<shard>.json  the last error of a shard task that gave up (cleared by its commit)
    _tmp/                   attempts in progress; never read

A shard counts as done only when its record exists. Readers trust only the ledger: a file
without a record is an unfinished attempt and is overwritten by the rerun.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import storage
from pipeline.schemas import LEDGER_RECORD, SCHEMA_VERSION, validate_record


class FingerprintMismatch(ValueError):
    """The stage folder holds output made from another config or input."""


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's output is a function of: its config, its inputs, its upstream stages."""

    stage: str
    config: dict
    inputs: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        body = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    def as_dict(self) -> dict:
        return {"stage": self.stage, "schema_version": SCHEMA_VERSION, "config": self.config, "inputs": self.inputs}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def describe_change(old: dict, new: dict) -> str:
    """One phrase naming what differs between two fingerprint dicts."""
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = []
    for key in changed[:3]:
        shown.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    return "; ".join(shown) + more


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard."""

    shard: str
    """Shard id, unique within the stage (also the record's file name)."""
    samples_in: int
    """Rows or samples the task read."""
    samples_out: int
    """Samples the committed shard holds."""
    files: tuple[str, ...]
    """The committed files, relative to the stage folder."""
    checksum: str
    """sha256 over the committed files' bytes, in `files` order."""
    fingerprint: str
    """Digest of the stage fingerprint it was made under."""
    counts: dict = field(default_factory=dict)
    """Per-reason counts (drops, failures) for this shard."""
    seconds: float = 0.0
    """Wall time of the task."""
    finished_at: float = 0.0
    """Unix time of the commit."""

    @classmethod
    def from_dict(cls, d: dict) -> ShardRecord:
        return cls(**{**d, "files": tuple(d["files"])})


def checksum_files(urls: list[str]) -> str:
    h = hashlib.sha256()
    for url in urls:
        fs, path = storage.get_fs(url)
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Ledger:
    """Reads and writes the ledger of one stage (or one phase of it) under `root`."""

    def __init__(self, root: str):
        self.root = root

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def attempt_dir(self, shard: str) -> str:
        """A fresh folder for one attempt at a shard (two attempts never share one)."""
        return self.path("_tmp", f"{shard}.{uuid.uuid4().hex[:8]}")

    def commit_files(
        self,
        shard: str,
        attempt: str,
        files: list[str],
        *,
        samples_in: int,
        samples_out: int,
        fingerprint: str,
        started: float,
        counts: dict | None = None,
    ) -> ShardRecord:
        """Moves `files` from the attempt folder into the stage folder, then commits the record."""
        for name in files:
            storage.move(storage.join(attempt, name), self.path(name))
        storage.remove_tree(attempt)
        record = ShardRecord(
            shard=shard,
            samples_in=samples_in,
            samples_out=samples_out,
            files=tuple(files),
            checksum=checksum_files([self.path(name) for name in files]),
            fingerprint=fingerprint,
            counts=counts or {},
            seconds=time.monotonic() - started,
        )
        self.commit(record)
        return record

    # -- fingerprint --------------------------------------------------------------------------
    def check(self, fp: Fingerprint, label: str) -> None:
        """Raises FingerprintMismatch if this folder was written under another fingerprint."""
        old = storage.read_json_or_none(self.path("_fingerprint.json"))
        if old is not None and old != fp.as_dict():
            raise FingerprintMismatch(
                f"stage '{label}': {self.root} was written by a different recipe or input "
                f"({describe_change(old, fp.as_dict())}); use --force {label} or another output_dir"
            )
        if old is None and self.done():
            raise FingerprintMismatch(f"stage '{label}': {self.root} holds shards but no _fingerprint.json")

    def claim(self, fp: Fingerprint, label: str) -> None:
        """Checks, then records the fingerprint (before the first shard is committed)."""
        self.check(fp, label)
        if not storage.exists(self.path("_fingerprint.json")):
            storage.write_json(self.path("_fingerprint.json"), fp.as_dict())

    # -- records ------------------------------------------------------------------------------
    def done(self) -> dict[str, ShardRecord]:
        records = {}
        for name in storage.list_names(self.path("_ledger"), ".json"):
            d = storage.read_json(self.path("_ledger", name))
            records[d["shard"]] = ShardRecord.from_dict(d)
        return records

    def record(self, shard: str) -> ShardRecord | None:
        """The committed record of `shard`, or None."""
        d = storage.read_json_or_none(self.path("_ledger", f"{shard}.json"))
        return None if d is None else ShardRecord.from_dict(d)

    def commit(self, record: ShardRecord) -> None:
        """Writes the shard's record: from now on the shard is done."""
        d = asdict(record)
        d["finished_at"] = d["finished_at"] or time.time()
        d["files"] = list(d["files"])
        validate_record(d, LEDGER_RECORD, f"ledger record {record.shard}")
        storage.write_json(self.path("_ledger", f"{record.shard}.json"), d)
        failure = self.path("_failures", f"{record.shard}.json")
        if storage.exists(failure):
            storage.get_fs(failure)[0].rm(storage.get_fs(failure)[1])

    def record_failure(self, shard: str, error: str) -> None:
        storage.write_json(self.path("_failures", f"{shard}.json"), {"shard": shard, "error": error, "at": time.time()})

    def failures(self) -> dict[str, dict]:
        return {
            n.removesuffix(".json"): storage.read_json(self.path("_failures", n))
            for n in storage.list_names(self.path("_failures"), ".json")
        }

    def clear_tmp(self) -> None:
        storage.remove_tree(self.path("_tmp"))
