"""The ledger: the manifest of a stage's finished shards, kept beside its output.

Layout under a stage folder `<output_dir>/<stage>/`:

    _fingerprint.json       what the output was made from (stage config + inputs); written first,
                            kept as written (a later release reads it through `Fingerprint.read`)
    _ledger/<shard>.json    one record per committed shard; written last, it IS the commit
    _ledger/_summary.parquet  the records compacted into one file (a cache: see `Ledger.done`)
    _failures/<shard>.json  the last error of a shard task that gave up (cleared by its commit)
    _tmp/                   attempts in progress; never read

A shard counts as done only when its record exists. Readers trust only the ledger: a file
without a record is an unfinished attempt and is overwritten by the rerun. Every shard is made
through an `Attempt`, the one place that writes a shard's files and commits them.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.loader import ShardSpan
from pipeline.engine.schemas import LEDGER_RECORD, SCHEMA_VERSION, validate_record
from pipeline.errors import FingerprintMismatch, ShardError

log = logging.getLogger(__name__)

SUMMARY = "_summary.parquet"


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's output is a function of: its config, its inputs, its upstream stages.

    Its `digest` names a stage folder to its downstream stages (their `inputs.upstream`) and to its
    shard records. A folder keeps the fingerprint it was first claimed under: a later release that
    reads it as the same recipe (`Ledger.check`) runs on under that stored fingerprint and digest,
    so a field added since changes neither the folder's digest nor those recorded downstream."""

    stage: str
    config: dict
    inputs: dict = field(default_factory=dict)
    added: dict[str, Any] = field(default_factory=dict, compare=False)
    """Config fields added after folders could already have been written (`Config.added_paths`):
    dotted path -> the value a stored fingerprint without that field is read as. Not digested."""
    dropped: frozenset[str] = field(default_factory=frozenset, compare=False)
    """Config fields that say how a stage runs, not what it writes (`Config.execution_paths`): a
    stored fingerprint from before one became so is read without it. Not digested."""

    @property
    def digest(self) -> str:
        body = json.dumps(self.as_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    def as_dict(self) -> dict:
        return {"stage": self.stage, "schema_version": SCHEMA_VERSION, "config": self.config, "inputs": self.inputs}

    def read(self, stored: dict) -> tuple[dict, list[str]]:
        """A stored fingerprint dict (`_fingerprint.json`) as this release reads it: the fields
        that are now `dropped` (execution-only) left out, and every field of `added` that its config
        lacks (it predates the field) filled in with its value, outer fields first. Also returns
        the paths filled in."""
        stored = copy.deepcopy(stored)
        for path in self.dropped:
            *parents, name = path.split(".")
            node = stored.get("config")
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(name, None)
        filled = []
        for path in sorted(self.added, key=lambda p: p.count(".")):
            *parents, name = path.split(".")
            node = stored.get("config")
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and name not in node:
                node[name] = copy.deepcopy(self.added[path])
                filled.append(path)
        return stored, filled


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

    # -- fingerprint --------------------------------------------------------------------------
    def check(self, fp: Fingerprint, label: str) -> Fingerprint:
        """The fingerprint this folder is under: the stored one when it reads as `fp` (a field added
        since it was written counts as the value `fp.added` gives it), else `fp` if the folder has
        none. Raises FingerprintMismatch if it was written under another fingerprint."""
        old = storage.read_json_or_none(self.path("_fingerprint.json"))
        if old is None:
            if self.done():
                raise FingerprintMismatch(f"stage '{label}': {self.root} holds shards but no _fingerprint.json")
            return fp
        (stored, filled), (now, _) = fp.read(old), fp.read(fp.as_dict())
        if stored != now:
            raise FingerprintMismatch(
                f"stage '{label}': {self.root} was written by a different recipe or input "
                f"({describe_change(stored, now)}); use --force {label} or another output_dir"
            )
        if filled:
            shown = ", ".join(f"{path}={fp.added[path]!r}" for path in filled)
            log.info("stage '%s': %s predates these fields and is read as %s", label, self.root, shown)
        return Fingerprint(old["stage"], old["config"], old["inputs"], fp.added, fp.dropped)

    def claim(self, fp: Fingerprint, label: str) -> Fingerprint:
        """Checks, then records the fingerprint (before the first shard is committed); returns the
        one the folder is under (see `check`)."""
        fp = self.check(fp, label)
        if not storage.exists(self.path("_fingerprint.json")):
            storage.write_json(self.path("_fingerprint.json"), fp.as_dict())
        return fp

    # -- records ------------------------------------------------------------------------------
    def done(self) -> dict[str, ShardRecord]:
        """Every committed record, in shard order, in a handful of requests whatever the shard count: the summary
        (one GET); when it does not hold every shard of its run, one listing of `_ledger/` and
        one batched read of the records it lacks. The summary is only a cache: deleted, stale or
        unreadable, the result is the same."""
        records, total = self._read_summary()
        if total is None or len(records) < total:
            names = storage.list_names(self.path("_ledger"), ".json")
            missing = [self.path("_ledger", n) for n in names if n.removesuffix(".json") not in records]
            for data in storage.read_many(missing).values():
                d = json.loads(data)
                records[d["shard"]] = ShardRecord.from_dict(d)
        return dict(sorted(records.items()))

    def _read_summary(self) -> tuple[dict[str, ShardRecord], int | None]:
        try:
            table = storage.read_parquet(self.path("_ledger", SUMMARY))
        except FileNotFoundError:
            return {}, None
        except (pa.ArrowException, OSError, ValueError) as err:
            log.warning("%s: ignoring an unreadable ledger summary (%s)", self.root, err)
            return {}, None
        records = {}
        for row in table.to_pylist():
            row["counts"] = dict(row["counts"])
            records[row["shard"]] = ShardRecord.from_dict(row)
        return records, int(table.schema.metadata[b"total"])

    def compact(self, records: dict[str, ShardRecord], total: int) -> None:
        """Writes `records` (committed ones, read back or just made) as the summary, for a run of
        `total` shards. Written by the driver, which holds the records anyway; never by tasks."""
        rows = [{**asdict(r), "files": list(r.files), "counts": list(r.counts.items())} for r in records.values()]
        table = pa.Table.from_pylist(rows, schema=LEDGER_RECORD).replace_schema_metadata({"total": str(total)})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        storage.write_atomic(self.path("_ledger", SUMMARY), buffer.getvalue())

    def spans(self) -> list[ShardSpan]:
        """Every committed shard's tar with its sample count from the ledger, in shard order
        (what the loaders read; planning them reads no data)."""
        spans = []
        for shard, record in sorted(self.done().items()):
            tars = [f for f in record.files if f.endswith(".tar")]
            if len(tars) != 1:
                raise ShardError(f"{self.root}: ledger record of shard {shard} names {len(tars)} tar files")
            if record.samples_out:
                spans.append(ShardSpan(self.path(tars[0]), record.samples_out))
        return spans

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
        storage.remove(self.path("_failures", f"{record.shard}.json"))

    def forget(self, shards: list[str]) -> None:
        """Takes `shards` out of the ledger (a damaged shard, to be made again by the next run),
        in an order a crash cannot turn into a wrong state: the stage's `_done.json` and the
        summary go first, then each record (the uncommit), then the shard's files."""
        storage.remove(self.path("_done.json"))
        storage.remove(self.path("_ledger", SUMMARY))
        for shard in shards:
            record = self.record(shard)
            storage.remove(self.path("_ledger", f"{shard}.json"))
            for name in record.files if record else ():
                storage.remove(self.path(name))

    def record_failure(self, shard: str, error: str) -> None:
        storage.write_json(self.path("_failures", f"{shard}.json"), {"shard": shard, "error": error, "at": time.time()})

    def failures(self) -> dict[str, dict]:
        return {
            n.removesuffix(".json"): storage.read_json(self.path("_failures", n))
            for n in storage.list_names(self.path("_failures"), ".json")
        }

    def clear_tmp(self) -> None:
        storage.remove_tree(self.path("_tmp"))


@dataclass(frozen=True)
class ShardResult:
    """What one attempt at a shard made: the counts its ledger record keeps."""

    samples_in: int
    """Rows or samples the attempt read."""
    samples_out: int
    """Samples the shard holds."""
    counts: dict[str, int] = field(default_factory=dict)
    """Per-reason counts (drops, failures)."""


class Attempt:
    """One try at a shard: its files are written under a fresh folder in `_tmp/` (two tries never
    share one), then `commit` moves them into the stage folder and writes the ledger record last.
    A try that dies before its commit leaves only `_tmp/` litter, which the next run clears."""

    def __init__(self, ledger: Ledger, shard: str, fingerprint: str):
        self.ledger = ledger
        self.shard = shard
        self.fingerprint = fingerprint
        self.folder = ledger.path("_tmp", f"{shard}.{uuid.uuid4().hex[:8]}")
        """The attempt's folder; files in it that are not named by `path` or `adopt` are dropped."""
        self.files: list[str] = []
        self._started = time.monotonic()

    def path(self, name: str) -> str:
        """Where to write `name`, a file of the shard (relative to the stage folder)."""
        self.adopt(name)
        return storage.join(self.folder, name)

    def write(self, name: str, data: bytes) -> None:
        """Writes the shard's file `name`."""
        storage.write_atomic(self.path(name), data)

    def adopt(self, *names: str) -> None:
        """Makes files another writer put into `folder` (img2dataset, a model export) part of the shard."""
        self.files += [n for n in names if n not in self.files]

    def commit(self, result: ShardResult) -> ShardRecord:
        """Moves the shard's files into place, then writes its record: from now on it is done."""
        for name in self.files:
            storage.move(storage.join(self.folder, name), self.ledger.path(name))
        storage.remove_tree(self.folder)
        record = ShardRecord(
            shard=self.shard,
            samples_in=result.samples_in,
            samples_out=result.samples_out,
            files=tuple(self.files),
            checksum=checksum_files([self.ledger.path(name) for name in self.files]),
            fingerprint=self.fingerprint,
            counts=dict(result.counts),
            seconds=time.monotonic() - self._started,
        )
        self.ledger.commit(record)
        return record
