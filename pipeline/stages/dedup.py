"""The filter's dedup on the cluster: hash shuffles through partitioned files, each phase a set of
Ray shard tasks with its own ledger under `filter/_dedup/`, so a killed run resumes phase by phase.

The raw shards (in shard order) are cut into groups of about `filter.dedup_rows_per_task` scanned
rows. For each enabled rule (`dedup_rules`: url, then exact, then near):

    map    (a task per group)   the group's survivors so far -> one file routing each row to a
                                bucket by its key's hash (near: one row per band)
    bucket (a task per bucket)  its rows from every map file -> the sids it drops (url, exact),
                                or its near links as a forest (near), routed by group

Near links then go through alternating large-star / small-star steps (a task per group each)
until a pair of steps changes nothing: every component is then a star around its smallest sid.
Finally `decide` (a task per group) writes each raw shard's decisions and the group's kept rows.

The driver holds the group and bucket lists and per-task counts, never per-sample data; every
task holds one group or one bucket. Decisions do not depend on the grouping (see `dedup_rules`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.partitions import read_partition, write_partitioned
from pipeline.engine.ledger import Attempt, Ledger, ShardRecord, ShardResult
from pipeline.engine.schemas import DECISIONS, FILTERED_MANIFEST
from pipeline.engine.tasks import ShardTask
from pipeline.errors import RunError
from pipeline.stages import dedup_rules as rules

RULES = {"url": "duplicate_url", "exact": "duplicate_exact", "near": "near_duplicate"}
"""The dedup rules in the order they run, and the drop reason each gives."""

MAX_STAR_ROUNDS = 64
"""Large-star/small-star pairs converge in O(log^2 n) rounds; far more means a bug."""


@dataclass(frozen=True)
class ScanShard:
    """One raw shard as the dedup reads it."""

    shard: str
    index: int
    """Position in shard order: the high bits of its samples' sids."""
    scan: str
    """Its `_scan/<shard>.parquet` (rows sorted by key)."""
    tar: str


@dataclass(frozen=True)
class DedupTask(ShardTask):
    def make(self, attempt: Attempt) -> ShardResult:
        raise NotImplementedError


def _group_of(sid: np.ndarray, group_starts: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(group_starts), rules.shard_index(sid), side="right") - 1


def _read_scan(part: ScanShard, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
    table = storage.read_parquet(part.scan).select(columns)
    return table, rules.sample_ids(part.index, table.num_rows)


def _each(fn, items, threads: int = 8) -> list:
    """fn over items on a few threads (object-store reads wait ~30 ms each), results in order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def _sids(urls: tuple[str, ...], group: int, column: str = "sid") -> np.ndarray:
    table = read_partition(list(urls), group, [column]) if urls else None
    return np.array([], dtype=np.uint64) if table is None else table[column].to_numpy().astype(np.uint64)


@dataclass(frozen=True)
class MapTask(DedupTask):
    """One group's survivors of the rules before `rule`, routed to `buckets` buckets."""

    rule: str
    group: int
    parts: tuple[ScanShard, ...]
    earlier: tuple[str, ...]
    """The drop files of the rules before (url, exact) and the final star files (near)."""
    buckets: int
    distance: int | None

    def make(self, attempt: Attempt) -> ShardResult:
        tables, sids = zip(*_each(lambda p: _read_scan(p, ["url", "caption", "sha256", "phash", "reason"]), self.parts))
        table, sid = pa.concat_tables(tables), np.concatenate(sids)
        dropped = _sids(self.earlier, self.group)
        alive = pc.is_null(table["reason"]).to_numpy(zero_copy_only=False) & ~np.isin(sid, dropped)
        if self.rule == "exact":
            alive &= pc.is_valid(table["sha256"]).to_numpy(zero_copy_only=False)
        if self.rule == "near":
            alive &= pc.is_valid(table["phash"]).to_numpy(zero_copy_only=False)
        table, sid = table.filter(pa.array(alive)), sid[alive]
        if self.rule == "near":
            phash = table["phash"].to_numpy().astype(np.uint64)
            keys, row = rules.band_keys(phash, self.distance)
            out = pa.table({"band_key": keys, "sid": sid[row], "phash": phash[row]})
            part = rules.partition_of(keys, self.buckets)
        else:
            if self.rule == "url":
                values = table["url"].to_pylist()
            else:
                values = [
                    f"{rules.normalize_caption(c)}\0{s}"
                    for c, s in zip(table["caption"].to_pylist(), table["sha256"].to_pylist())
                ]
            h = rules.hash128(values)
            out = pa.table({"h0": h[:, 0], "h1": h[:, 1], "sid": sid})
            part = rules.partition_of(h[:, 0], self.buckets)
        write_partitioned(attempt.path(f"{self.shard}.parquet"), out, part)
        return ShardResult(samples_in=len(alive), samples_out=out.num_rows)


@dataclass(frozen=True)
class BucketTask(DedupTask):
    """One bucket of `rule`: its drops (url, exact) or its near links (near), routed by group."""

    rule: str
    bucket: int
    maps: tuple[str, ...]
    group_starts: tuple[int, ...]
    distance: int | None

    def make(self, attempt: Attempt) -> ShardResult:
        rows = read_partition(list(self.maps), self.bucket)
        path = attempt.path(f"{self.shard}.parquet")
        n = 0 if rows is None else rows.num_rows
        col = lambda name: rows[name].to_numpy().astype(np.uint64)  # noqa: E731
        if self.rule == "near":
            edges = (
                np.empty((0, 2), np.uint64)
                if rows is None
                else rules.near_edges(col("band_key"), col("sid"), col("phash"), self.distance)
            )
            _write_edges(path, rules.both_ways(edges), self.group_starts)
            return ShardResult(samples_in=n, samples_out=len(edges))
        drops = np.array([], np.uint64) if rows is None else rules.later_of_groups(col("h0"), col("h1"), col("sid"))
        write_partitioned(path, pa.table({"sid": pa.array(drops, pa.uint64())}), _group_of(drops, self.group_starts))
        return ShardResult(samples_in=n, samples_out=len(drops))


def _write_edges(path: str, rows: np.ndarray, group_starts: tuple[int, ...]) -> None:
    table = pa.table({"u": pa.array(rows[:, 0], pa.uint64()), "v": pa.array(rows[:, 1], pa.uint64())})
    write_partitioned(path, table, _group_of(rows[:, 0], group_starts))


def _read_edges(urls: tuple[str, ...], group: int) -> np.ndarray:
    table = read_partition(list(urls), group, ["u", "v"]) if urls else None
    if table is None:
        return np.empty((0, 2), dtype=np.uint64)
    return np.stack([table["u"].to_numpy(), table["v"].to_numpy()], axis=1).astype(np.uint64)


@dataclass(frozen=True)
class StarTask(DedupTask):
    """One large- or small-star step over the near links of the nodes of one group."""

    step: str
    group: int
    inputs: tuple[str, ...]
    group_starts: tuple[int, ...]

    def make(self, attempt: Attempt) -> ShardResult:
        rows = _read_edges(self.inputs, self.group)
        edges, changed = (rules.large_star if self.step == "large" else rules.small_star)(rows)
        out = rules.both_ways(edges)
        _write_edges(attempt.path(f"{self.shard}.parquet"), out, self.group_starts)
        return ShardResult(samples_in=len(rows), samples_out=len(out), counts={"changed": changed})


@dataclass(frozen=True)
class DecideTask(DedupTask):
    """One group's decisions: `<raw shard>.parquet` (key, reason) per raw shard, and its kept
    rows in key order as `kept-<group>.parquet` (what the write tasks read, a slice each)."""

    group: int
    parts: tuple[ScanShard, ...]
    drops: tuple[tuple[str, tuple[str, ...]], ...]
    """(rule, its drop files) for url and exact; (near, the final star files)."""
    row_group: int

    def make(self, attempt: Attempt) -> ShardResult:
        dropped = {
            rule: rules.non_roots(_read_edges(urls, self.group)) if rule == "near" else _sids(urls, self.group)
            for rule, urls in self.drops
        }
        columns = [f.name for f in FILTERED_MANIFEST if f.name != "source_shard"] + ["reason"]
        paths = [attempt.path(f"{part.shard}.parquet") for part in self.parts]  # files in shard order

        def decide(i: int) -> tuple[list[str | None], pa.Table]:
            part = self.parts[i]
            table, sid = _read_scan(part, columns)
            reasons = table["reason"].to_pylist()
            for rule, sids in dropped.items():
                for k in np.flatnonzero(np.isin(sid, sids)):
                    reasons[k] = RULES[rule]
            decided = pa.table({"key": table["key"], "reason": pa.array(reasons, pa.string())})
            storage.write_parquet(paths[i], decided.cast(DECISIONS))
            rows = table.filter(pa.array([r is None for r in reasons])).drop_columns(["reason"])
            rows = rows.append_column("source_shard", pa.array([part.shard] * rows.num_rows, pa.string()))
            return reasons, rows.append_column("source_tar", pa.array([part.tar] * rows.num_rows, pa.string()))

        counts: dict[str, int] = {}
        kept = []
        for reasons, rows in _each(decide, range(len(self.parts))):
            for reason in reasons:
                if reason is not None:
                    counts[reason] = counts.get(reason, 0) + 1
            kept.append(rows)
        table = pa.concat_tables(kept)
        fs, path = storage.get_fs(attempt.path(f"kept-{self.shard}.parquet"))
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=self.row_group)
        samples_in = table.num_rows + sum(counts.values())
        return ShardResult(samples_in=samples_in, samples_out=table.num_rows, counts=counts)


def read_kept(url: str, start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of a group's kept file, reading only the row groups that hold them."""
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        groups, offset, first = [], 0, None
        for i in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(i).num_rows
            if offset < stop and offset + n > start:
                groups.append(i)
                first = offset if first is None else first
            offset += n
        table = parquet.read_row_groups(groups)
    return table.slice(start - first, stop - start)


@dataclass(frozen=True)
class DedupPlan:
    """How the dedup splits its work; written once (`_dedup/_plan.json`) so a resumed run routes
    rows exactly as the first one did, whatever the recipe's execution settings say now."""

    group_starts: tuple[int, ...]
    """Shard index where each group starts."""
    buckets: int
    near_buckets: int

    @classmethod
    def make(cls, rows_per_shard: list[int], rows_per_task: int, distance: int | None) -> DedupPlan:
        starts, acc = [0], 0
        for i, n in enumerate(rows_per_shard):
            if acc and acc + n > rows_per_task:
                starts.append(i)
                acc = 0
            acc += n
        total = sum(rows_per_shard)
        buckets = max(1, math.ceil(total / rows_per_task))
        near = max(1, math.ceil(total * ((distance or 0) + 1) / rows_per_task))
        return cls(tuple(starts), buckets, near)

    def groups(self, shards: list[ScanShard]) -> list[tuple[ScanShard, ...]]:
        ends = [*self.group_starts[1:], len(shards)]
        return [tuple(shards[s:e]) for s, e in zip(self.group_starts, ends) if e > s]


class Dedup:
    """Runs the phases above through `run_phase(name, tasks) -> records` (the stage's executor)."""

    def __init__(self, root: str, cfg: Any, run_phase: Any):
        self.root = root
        self.cfg = cfg
        self.run_phase = run_phase

    def ledger(self, phase: str) -> Ledger:
        return Ledger(storage.join(self.root, phase))

    def _files(self, phase: str, records: dict[str, ShardRecord]) -> tuple[str, ...]:
        ledger = self.ledger(phase)
        return tuple(ledger.path(records[s].files[0]) for s in sorted(records))

    def plan(self, shards: list[ScanShard], rows_per_shard: list[int]) -> DedupPlan:
        url = storage.join(self.root, "_plan.json")
        saved = storage.read_json_or_none(url)
        if saved is not None:
            return DedupPlan(tuple(saved["group_starts"]), saved["buckets"], saved["near_buckets"])
        plan = DedupPlan.make(rows_per_shard, self.cfg.dedup_rows_per_task, self.cfg.near_duplicate_distance)
        storage.write_json(
            url,
            {
                "group_starts": list(plan.group_starts),
                "buckets": plan.buckets,
                "near_buckets": plan.near_buckets,
                "shards": len(shards),
            },
        )
        return plan

    def rules(self) -> list[str]:
        on = {
            "url": self.cfg.dedup_url,
            "exact": self.cfg.dedup_exact,
            "near": self.cfg.near_duplicate_distance is not None,
        }
        return [r for r in RULES if on[r]]

    def run(self, shards: list[ScanShard], rows_per_shard: list[int]) -> dict[str, ShardRecord]:
        """All phases; returns the decide records (one per group, in group order)."""
        plan = self.plan(shards, rows_per_shard)
        groups = plan.groups(shards)
        distance = self.cfg.near_duplicate_distance
        drops: list[tuple[str, tuple[str, ...]]] = []
        for rule in self.rules():
            earlier = tuple(f for _, files in drops for f in files)
            buckets = plan.near_buckets if rule == "near" else plan.buckets
            maps = self.run_phase(
                f"{rule}-map",
                [MapTask(f"g{g:05d}", rule, g, parts, earlier, buckets, distance) for g, parts in enumerate(groups)],
            )
            map_files = self._files(f"{rule}-map", maps)
            found = self.run_phase(
                f"{rule}-bucket",
                [BucketTask(f"b{b:05d}", rule, b, map_files, plan.group_starts, distance) for b in range(buckets)],
            )
            files = self._files(f"{rule}-bucket", found)
            if rule == "near":
                files = (
                    self._stars(files, len(groups), plan.group_starts)
                    if any(r.samples_out for r in found.values())
                    else ()
                )
            drops.append((rule, files))
        return self.run_phase(
            "decide",
            [DecideTask(f"g{g:05d}", g, parts, tuple(drops), self.cfg.shard_size) for g, parts in enumerate(groups)],
        )

    def _stars(self, files: tuple[str, ...], groups: int, group_starts: tuple[int, ...]) -> tuple[str, ...]:
        for k in range(MAX_STAR_ROUNDS):
            changed = 0
            for step in ("large", "small"):
                phase = f"near-star-{k:02d}-{step}"
                records = self.run_phase(
                    phase, [StarTask(f"g{g:05d}", step, g, files, group_starts) for g in range(groups)]
                )
                files = self._files(phase, records)
                changed += sum(r.counts.get("changed", 0) for r in records.values())
            if not changed:
                return files
        raise RunError(f"filter dedup: near-duplicate components did not converge in {MAX_STAR_ROUNDS} rounds")
