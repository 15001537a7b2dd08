"""`dalle validate PATH [--drop-damaged]`: checks a stage's shard set (ingest, filter or encode)
against `schemas/`; `--drop-damaged` takes the damaged shards out of the ledger for a rerun to redo.

Per committed shard: the files the ledger names exist and still have its checksum; the tar is
whole (end-of-archive marker) and readable; every sample has exactly the members of its stage,
arrays with the dtype and shape of `schemas/` (sizes from the stage's `_plan.json`), unit-norm
embeddings, in-vocabulary token ids; keys are unique and in the same order as the shard's parquet
manifest; the sample count equals the ledger's. Problems are listed per shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.shards import iter_samples, npy_load
from pipeline.engine.ledger import Ledger, ShardRecord, checksum_files
from pipeline.engine.schemas import (
    ENCODED_ARRAYS,
    ENCODED_MANIFEST,
    ENCODED_MEMBERS,
    FILTERED_MANIFEST,
    FILTERED_MEMBERS,
    RAW_MANIFEST,
    RAW_MEMBERS,
    validate_table,
)
from pipeline.errors import InputError, SchemaError, one_line

KINDS = {
    "ingest": (RAW_MEMBERS, RAW_MANIFEST),
    "filter": (FILTERED_MEMBERS, FILTERED_MANIFEST),
    "encode": (ENCODED_MEMBERS, ENCODED_MANIFEST),
}
NORM_TOLERANCE = 1e-2  # float16 embeddings
VOCABS = {"image_tokens.npy": "image_vocab", "text_tokens.npy": "text_vocab"}


@dataclass
class Report:
    stage: str
    shards: int = 0
    samples: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, shard: str, message: str) -> None:
        self.problems.setdefault(shard, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "shards": self.shards, "samples": self.samples, "problems": self.problems}

    def lines(self, path: str) -> list[str]:
        """One line per problem, then the verdict."""
        out = [f"{path}: shard {shard}: {p}" for shard, problems in sorted(self.problems.items()) for p in problems]
        n = sum(len(p) for p in self.problems.values())
        verdict = "ok" if self.ok else f"{n} problems in {len(self.problems)} shards"
        return [*out, f"{self.stage}: {self.shards} shards, {self.samples} samples: {verdict}"]


def _manifest_keys(url: str, stage: str, schema) -> list[str]:
    table = storage.read_parquet(url)
    validate_table(table, schema, url)
    if stage == "ingest":  # img2dataset's parquet lists every URL-list row; the tar holds successes
        return [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == "success"]
    return table["key"].to_pylist()


def _array_problems(sample: dict[str, Any], plan: dict[str, Any]) -> Iterator[str]:
    for member, (dtype, dims) in ENCODED_ARRAYS.items():
        if member not in sample:
            continue
        try:
            array = npy_load(sample[member])
        except ValueError as err:
            yield f"{member} is not a .npy array ({err})"
            continue
        shape = tuple(plan.get(d) for d in dims)
        if str(array.dtype) != dtype or array.shape != shape:
            yield f"{member} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        elif member.startswith("clip_") and abs(float(np.linalg.norm(array.astype(np.float32))) - 1) > NORM_TOLERANCE:
            yield f"{member} is not L2-normalised"
        elif member in VOCABS and array.size and int(array.max()) >= plan.get(VOCABS[member], 1 << 16):
            yield f"{member} holds id {int(array.max())}, the vocabulary has {plan[VOCABS[member]]}"


def check_shard(stage_url: str, stage: str, record: ShardRecord, plan: dict[str, Any], report: Report) -> None:
    """Adds the problems of one committed shard to `report`."""
    name = record.shard
    urls = [storage.join(stage_url, f) for f in record.files]
    missing = [f for f, u in zip(record.files, urls) if not storage.exists(u)]
    if missing:
        report.add(name, f"missing files: {', '.join(missing)}")
        return
    if checksum_files(urls) != record.checksum:
        report.add(name, "files differ from the ledger's checksum (modified after commit)")
    tar = next(u for u in urls if u.endswith(".tar"))
    members, schema = KINDS[stage]
    try:
        expected_keys = _manifest_keys(next(u for u in urls if u.endswith(".parquet")), stage, schema)
    except SchemaError as err:
        report.add(name, str(err))
        expected_keys = None
    keys: list[str] = []
    try:
        for sample in iter_samples(tar):
            key = sample.pop("__key__")
            keys.append(key)
            absent = sorted(set(members) - set(sample))
            extra = sorted(set(sample) - set(members))
            if absent:
                report.add(name, f"key {key}: missing member {', '.join(absent)}")
            if extra:
                report.add(name, f"key {key}: unexpected member {', '.join(extra)}")
            if "json" in sample:
                try:
                    json.loads(sample["json"])
                except ValueError:
                    report.add(name, f"key {key}: json member does not parse")
            if stage == "encode":
                for problem in _array_problems(sample, plan):
                    report.add(name, f"key {key}: {problem}")
    except Exception as err:  # noqa: BLE001 - a truncated or corrupt tar is a finding, not a crash
        report.add(name, f"{record.files[0]}: unreadable: {one_line(err, typed=False)}")
        return
    report.samples += len(keys)
    if len(keys) != record.samples_out:
        report.add(name, f"holds {len(keys)} samples, the ledger says {record.samples_out}")
    if len(set(keys)) != len(keys):
        report.add(name, f"{len(keys) - len(set(keys))} duplicate keys")
    if expected_keys is not None and keys != expected_keys:
        report.add(name, "tar keys are not the manifest's keys in the manifest's order")


def validate(path: str) -> Report:
    """Checks every committed shard of the stage folder at `path`. Raises InputError when `path`
    is not a stage folder with shards."""
    url = storage.absolute(path)
    fingerprint = storage.read_json_or_none(storage.join(url, "_fingerprint.json"))
    if fingerprint is None:
        raise InputError(f"{path}: not a stage folder (no _fingerprint.json)")
    stage = fingerprint["stage"]
    if stage not in KINDS:
        raise InputError(f"{path}: stage '{stage}' has no shard set; validate reads {', '.join(KINDS)} folders")
    plan = storage.read_json_or_none(storage.join(url, "_plan.json")) or {}
    report = Report(stage)
    records = Ledger(url).done()
    for _, record in sorted(records.items()):
        report.shards += 1
        check_shard(url, stage, record, plan, report)
    if storage.exists(storage.join(url, "_done.json")) and plan.get("shards") not in (None, len(records)):
        report.add("-", f"the stage is marked done with {len(records)} shards, its plan has {plan['shards']}")
    return report


def drop_damaged(path: str, report: Report) -> list[str]:
    """Takes the shards with problems out of the stage's ledger (and deletes their files), so that
    the next `dalle run` makes them again; returns their names."""
    damaged = sorted(shard for shard in report.problems if shard != "-")
    if damaged:
        Ledger(storage.absolute(path)).forget(damaged)
    return damaged
