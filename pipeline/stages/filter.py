"""filter: raw shards → the paper's caption/image rules, dedup → fixed-size filtered shards.

Phases, each a set of Ray shard tasks with its own ledger, so a killed run resumes phase by phase:
1. scan (a task per raw shard, ledger `_scan/`): per-sample facts (caption and image rules,
   sha256, perceptual hash), sorted by key → `_scan/<shard>.parquet`.
2. dedup (`pipeline.stages.dedup`, ledgers under `_dedup/`): URL, caption+image hash and
   near-duplicate perceptual hash, by hash shuffles on the cluster; then a task per group of raw
   shards writes `_decisions/<raw shard>.parquet` (key, reason) and the group's kept rows.
3. write (a task per output shard, the stage ledger): the kept samples, in key order, cut into
   shards of `shard_size`: `<shard>.tar` + `<shard>.parquet`. The driver plans them from the kept
   count of each group alone.

Deterministic, so a rerun after a crash makes the same plan; the driver never holds per-sample data.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.config.data import FilterSection
from pipeline.data.shards import iter_samples, write_tar
from pipeline.engine.ledger import Attempt, Ledger, ShardRecord, ShardResult
from pipeline.engine.schemas import FILTER_FACTS, FILTERED_MANIFEST, validate_table
from pipeline.engine.tasks import ShardTask
from pipeline.stages.base import RunContext, Stage, StageStatus
from pipeline.stages.dedup import Dedup, DedupTask, ScanShard, read_kept
from pipeline.stages.filter_rules import REASONS, LanguageID, phash64, sample_reason

FACTS = FILTER_FACTS.append(pa.field("reason", pa.string()))
"""A scan table: the facts of every sample of a raw shard and its per-sample drop reason."""


def drop_counts(reasons: list[str | None]) -> dict[str, int]:
    """Samples per drop reason (every reason, zeros included)."""
    counts = dict.fromkeys(REASONS, 0)
    for reason in reasons:
        if reason is not None:
            counts[reason] += 1
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

    slices: tuple[tuple[str, int, int], ...]
    """(a group's kept file, start, stop): the shard's rows, in order."""


def commit_scan(table: pa.Table, attempt: Attempt, where: str) -> ShardResult:
    """Writes a scan table (sorted by key) as the attempt's `<shard>.parquet`."""
    validate_table(table, FACTS, where)
    table = table.sort_by("key")
    storage.write_parquet(attempt.path(f"{attempt.shard}.parquet"), table)
    counts = drop_counts(table["reason"].to_pylist())
    return ShardResult(samples_in=table.num_rows, samples_out=table.num_rows - sum(counts.values()), counts=counts)


def scan_shard(cfg: FilterSection, langid: LanguageID, task: ScanTask, attempt: Attempt) -> ShardResult:
    """Phase 1: per-sample facts of one raw shard into `<shard>.parquet` (of the `_scan` ledger)."""
    rows = [_facts_row(s, task.shard, cfg, langid) for s in iter_samples(task.tar)]
    return commit_scan(pa.Table.from_pylist(rows, schema=FACTS), attempt, f"filter scan of {task.tar}")


def write_shard(task: WriteTask, attempt: Attempt) -> ShardResult:
    """Phase 3: copies the kept samples (already in key order) into one output shard."""
    rows = pa.concat_tables([read_kept(url, start, stop) for url, start, stop in task.slices])
    keys = rows["key"].to_pylist()
    wanted = {key: i for i, key in enumerate(keys)}
    picked: list[dict | None] = [None] * len(wanted)
    for tar in sorted(set(rows["source_tar"].to_pylist())):
        for sample in iter_samples(tar):
            if sample["__key__"] in wanted:
                picked[wanted[sample["__key__"]]] = sample
    missing = [k for k, i in wanted.items() if picked[i] is None]
    if missing:
        raise RuntimeError(f"filter shard {task.shard}: {len(missing)} planned samples not found, e.g. {missing[0]}")
    manifest = rows.select(FILTERED_MANIFEST.names).cast(FILTERED_MANIFEST)
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

    def status(self) -> StageStatus:
        """While the stage runs, the scan phase's per-sample drop counts (dedup comes after it)."""
        status = super().status()
        if status.state in ("complete", "pending"):
            return status
        scan = Ledger(storage.join(self.url, "_scan")).done().values()
        return replace(
            status,
            scanned_shards=len(scan),
            counts={r: sum(rec.counts.get(r, 0) for rec in scan) for r in REASONS},
            samples_in=sum(rec.samples_in for rec in scan),
        )

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        if isinstance(task, ScanTask):
            return scan_shard(self.cfg, LanguageID(), task, attempt)
        if isinstance(task, DedupTask):
            return task.make(attempt)
        return write_shard(task, attempt)

    def plan_output(self, ctx: RunContext, raw: dict[str, str]) -> tuple[list[WriteTask], dict[str, Any]]:
        """Phases 1-2 (scan, dedup): the write tasks and the stage's counts."""
        cfg: FilterSection = self.cfg
        scan = Ledger(storage.join(self.url, "_scan"))
        scanned = self.run_shards(ctx, [ScanTask(s, tar) for s, tar in raw.items()], ledger=scan, label="filter (scan)")
        shards = [ScanShard(s, i, scan.path(scanned[s].files[0]), tar) for i, (s, tar) in enumerate(raw.items())]

        def run_phase(phase: str, tasks: list[DedupTask]) -> dict[str, ShardRecord]:
            root = storage.join(self.url, *(["_decisions"] if phase == "decide" else ["_dedup", phase]))
            return self.run_shards(ctx, tasks, ledger=Ledger(root), label=f"filter ({phase})")

        decided = Dedup(storage.join(self.url, "_dedup"), cfg, run_phase).run(
            shards, [scanned[s].samples_in for s in raw]
        )
        decisions = Ledger(storage.join(self.url, "_decisions"))
        kept_files = [(decisions.path(r.files[-1]), r.samples_out) for _, r in sorted(decided.items())]
        total = sum(n for _, n in kept_files)
        tasks, group, offset = [], 0, 0  # offset: first kept row of `group` not yet planned
        for i, start in enumerate(range(0, total, cfg.shard_size)):
            need, slices = min(cfg.shard_size, total - start), []
            while need:
                url, n = kept_files[group]
                take = min(need, n - offset)
                if take:
                    slices.append((url, offset, offset + take))
                need, offset = need - take, offset + take
                if offset == n:
                    group, offset = group + 1, 0
            tasks.append(WriteTask(f"{i:05d}", tuple(slices)))
        counts = dict.fromkeys(REASONS, 0)
        for record in decided.values():
            for reason, n in record.counts.items():
                counts[reason] += n
        stats = {"shards": len(tasks), "samples_in": sum(r.samples_in for r in decided.values()), "samples_out": total}
        return tasks, {**stats, "counts": counts}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        tasks, stats = self.plan_output(ctx, self._raw_shards())
        self.write_plan(len(tasks), samples=stats["samples_out"])
        self.run_shards(ctx, tasks)
        return stats
