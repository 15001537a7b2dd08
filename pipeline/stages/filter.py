"""filter: raw shards → the paper's caption/image rules, dedup → fixed-size filtered shards.

Three phases, each resumable:
1. scan (a Ray task per raw shard, ledger `_scan/`): per-sample facts (caption and image rules,
   sha256, perceptual hash) → `_scan/<shard>.parquet`.
2. decide (driver): dedup across all shards in key order (URL, caption+image hash, near-duplicate
   perceptual hash), then the survivors, sorted by key, are cut into shards of `shard_size`.
   Deterministic, so a rerun after a crash makes the same plan.
3. write (a Ray task per output shard, the stage ledger): copy the chosen samples' bytes into
   `<shard>.tar` + `<shard>.parquet`.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from pipeline import storage
from pipeline.config.data import FilterSection
from pipeline.data.shards import iter_samples, write_tar
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.schemas import FILTER_FACTS, FILTERED_MANIFEST, validate_table
from pipeline.engine.tasks import ShardTask
from pipeline.stages.base import RunContext, Stage, StageStatus
from pipeline.stages.filter_rules import (
    REASONS,
    LanguageID,
    SampleFacts,
    count_reasons,
    dedup,
    phash64,
    sample_reason,
)


def drop_counts(decisions: dict[str, str | None]) -> dict[str, int]:
    """Samples per drop reason (every reason, zeros included)."""
    counts = count_reasons(decisions)
    del counts["kept"]
    return counts


def _facts_row(sample: dict, source: str, cfg: FilterSection, langid: LanguageID) -> dict[str, Any]:
    meta = json.loads(sample["json"])
    caption = sample.get("txt", b"").decode("utf-8", errors="replace")
    width, height = meta.get("original_width"), meta.get("original_height")
    reason = sample_reason(caption, width, height, cfg, langid)
    with Image.open(io.BytesIO(sample["jpg"])) as img:
        phash = phash64(img)
    return {
        "key": sample["__key__"],
        "url": meta.get("url") or "",
        "caption": caption,
        "sha256": meta.get("sha256"),
        "phash": phash,
        "original_width": width,
        "original_height": height,
        "source_shard": source,
        "reason": reason,
    }


@dataclass(frozen=True)
class ScanTask(ShardTask):
    """Phase 1: the facts of one raw shard (`shard` is the raw shard's id)."""

    tar: str


@dataclass(frozen=True)
class WriteTask(ShardTask):
    """Phase 3: one output shard, the kept samples in key order."""

    keys: tuple[str, ...]
    sources: tuple[str, ...]
    """The raw tars holding those samples."""
    manifest: tuple[dict[str, Any], ...]
    """The samples' manifest rows, in `keys` order."""


def scan_shard(cfg: FilterSection, langid: LanguageID, task: ScanTask, attempt: Attempt) -> ShardResult:
    """Phase 1: per-sample facts of one raw shard into `<shard>.parquet` (of the `_scan` ledger)."""
    rows = [_facts_row(s, task.shard, cfg, langid) for s in iter_samples(task.tar)]
    table = pa.Table.from_pylist(rows, schema=FILTER_FACTS.append(pa.field("reason", pa.string())))
    validate_table(table, FILTER_FACTS, f"filter scan of {task.tar}")
    storage.write_parquet(attempt.path(f"{task.shard}.parquet"), table)
    counts = drop_counts(dict(zip(table["key"].to_pylist(), table["reason"].to_pylist())))
    return ShardResult(samples_in=table.num_rows, samples_out=table.num_rows - sum(counts.values()), counts=counts)


def write_shard(task: WriteTask, attempt: Attempt) -> ShardResult:
    """Phase 3: copies the kept samples (already in key order) into one output shard."""
    wanted = {key: i for i, key in enumerate(task.keys)}
    picked: list[dict | None] = [None] * len(wanted)
    for tar in task.sources:
        for sample in iter_samples(tar):
            if sample["__key__"] in wanted:
                picked[wanted[sample["__key__"]]] = sample
    missing = [k for k, i in wanted.items() if picked[i] is None]
    if missing:
        raise RuntimeError(f"filter shard {task.shard}: {len(missing)} planned samples not found, e.g. {missing[0]}")
    manifest = pa.Table.from_pylist(list(task.manifest), schema=FILTERED_MANIFEST)
    validate_table(manifest, FILTERED_MANIFEST, f"filter shard {task.shard} manifest")
    members = ("__key__", "jpg", "txt", "json")
    write_tar(attempt.path(f"{task.shard}.tar"), ({m: s[m] for m in members} for s in picked))
    storage.write_parquet(attempt.path(f"{task.shard}.parquet"), manifest)
    return ShardResult(samples_in=len(wanted), samples_out=len(wanted))


class FilterStage(Stage):
    name = "filter"
    config_key = "filter"
    upstream = ("ingest",)

    def _raw_shards(self) -> dict[str, str]:
        """Raw shard id → tar URL, from ingest's ledger only."""
        ingest = self.upstream_url("ingest")
        return {s: storage.join(ingest, r.files[0]) for s, r in sorted(Ledger(ingest).done().items())}

    def decisions(self, facts: pa.Table) -> dict[str, str | None]:
        """Key → drop reason (None = kept): per-sample reasons from the scan, then dedup."""
        reasons = dict(zip(facts["key"].to_pylist(), facts["reason"].to_pylist()))
        survivors = facts.filter(pc.is_null(facts["reason"])).select(list(SampleFacts.__dataclass_fields__))
        reasons.update(dedup([SampleFacts(**row) for row in survivors.to_pylist()], self.cfg))
        return reasons

    def status(self) -> StageStatus:
        """While the stage runs, the scan phase's per-sample drop counts (dedup comes after it)."""
        status = super().status()
        if status.state == "complete":
            return status
        scan = Ledger(storage.join(self.url, "_scan")).done().values()
        return replace(
            status,
            scanned_shards=len(scan),
            counts={r: sum(rec.counts.get(r, 0) for rec in scan) for r in REASONS},
            samples_in=sum(rec.samples_in for rec in scan),
        )

    def process(self, task: ScanTask | WriteTask, attempt: Attempt) -> ShardResult:
        if isinstance(task, ScanTask):
            return scan_shard(self.cfg, LanguageID(), task, attempt)
        return write_shard(task, attempt)

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg: FilterSection = self.cfg
        raw = self._raw_shards()
        scan = Ledger(storage.join(self.url, "_scan"))
        scan_tasks = [ScanTask(s, tar) for s, tar in raw.items()]
        records = self.run_shards(ctx, scan_tasks, ledger=scan, label="filter (scan)")
        facts = pa.concat_tables([storage.read_parquet(scan.path(r.files[0])) for r in records.values()])
        decisions = self.decisions(facts)
        kept = sorted(k for k, reason in decisions.items() if reason is None)
        by_key = {row["key"]: row for row in facts.drop_columns(["reason"]).to_pylist()}
        shards = [kept[i : i + cfg.shard_size] for i in range(0, len(kept), cfg.shard_size)]
        self.write_plan(len(shards), samples=len(kept))
        tasks = []
        for i, keys in enumerate(shards):
            sources = sorted({by_key[k]["source_shard"] for k in keys})
            manifest = tuple(by_key[k] for k in keys)
            tasks.append(WriteTask(f"{i:05d}", tuple(keys), tuple(raw[s] for s in sources), manifest))
        self.run_shards(ctx, tasks)
        storage.write_parquet(
            storage.join(self.url, "_decisions.parquet"),
            pa.table({"key": list(decisions), "reason": list(decisions.values())}),
        )
        counts = drop_counts(decisions)
        return {"shards": len(shards), "samples_in": len(decisions), "samples_out": len(kept), "counts": counts}
