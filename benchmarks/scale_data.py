"""The filter's planning + dedup at scale, on local Ray: flat memory on the driver and in every task.

    python benchmarks/scale_data.py --rows 1000000 [--dup-rate 0.1] [--shard-size 10000]
        [--rows-per-task 1000000] [--cpus 2] [--json]

A child process writes the scan output of `--rows` synthetic samples as committed scan shards
(`pipeline.synthetic.facts`: URL, exact and near duplicates, blank images and a skewed band), and
the same rows as `--lists` parquet URL lists, so the measured process never holds them. Then, on
local Ray, the ingest stage plans the URL lists (a task per list writing its input shards), and
the real `FilterStage.plan_output` runs: the scan phase finds every shard in its ledger, the dedup
phases run as Ray tasks, and the write tasks are planned (not run: they would copy images this
benchmark has none of).

Prints JSON: rows, seconds (filter planning + dedup), plan_lists_s (the URL lists' planning),
driver_peak_rss_mb (this process's peak over both),
task_peak_rss_mb (the largest resident set any Ray worker reached, sampled every 50 ms), kept,
drops per reason, the number of dedup tasks and of output shards planned, and per phase its tasks,
their summed seconds and the rows they wrote.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import threading
import time


def write_inputs(root: str, rows: int, shard_size: int, dup_rate: float, seed: int, lists: int) -> None:
    """The scan output (committed scan shards) and, from the same rows, `lists` URL lists."""
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.engine.ledger import Attempt, Ledger
    from pipeline.stages.filter import commit_scan
    from pipeline.synthetic.facts import scan_tables

    ledger = Ledger(storage.join(root, "filter", "_scan"))
    shards = -(-rows // shard_size)
    writers: dict[int, pq.ParquetWriter] = {}
    for i, (shard, table) in enumerate(scan_tables(rows, shard_size=shard_size, dup_rate=dup_rate, seed=seed)):
        attempt = Attempt(ledger, shard, "bench")
        attempt.commit(commit_scan(table, attempt, shard))
        part = table.select(["url", "caption"])
        k = i * lists // shards
        if k not in writers:
            writers[k] = pq.ParquetWriter(storage.join(root, "lists", f"{k:03d}.parquet"), part.schema)
        writers[k].write_table(part)
    for writer in writers.values():
        writer.close()


class WorkerRss:
    """Samples the resident set of every Ray worker process (`ray::...`) until stopped."""

    def __init__(self, period_s: float = 0.05):
        self.period_s = period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if title.startswith("ray::"):
                        self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(self.period_s)

    def __enter__(self) -> WorkerRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dup-rate", type=float, default=0.1)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--rows-per-task", type=int, default=1_000_000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lists", type=int, default=4, help="URL lists the same rows are split into")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench-scale-data-")
    started = time.monotonic()
    os.makedirs(os.path.join(work, "lists"))
    child = multiprocessing.get_context("spawn").Process(
        target=write_inputs, args=(work, args.rows, args.shard_size, args.dup_rate, args.seed, args.lists)
    )
    child.start()
    child.join()
    if child.exitcode:
        sys.exit(f"scale_data: writing the scan output failed (exit {child.exitcode})")
    generate_s = time.monotonic() - started

    import ray

    from pipeline import storage
    from pipeline.config.recipe import build_recipe
    from pipeline.engine.ledger import Ledger
    from pipeline.observe.progress import StageProgress
    from pipeline.stages.base import RunContext
    from pipeline.stages.filter import FilterStage
    from pipeline.stages.ingest import IngestStage

    recipe = build_recipe(
        {
            "name": "bench-scale-data",
            "output_dir": work,
            "ray": {"num_cpus": args.cpus},
            "ingest": {
                "url_lists": sorted(os.path.join(work, "lists", n) for n in os.listdir(os.path.join(work, "lists"))),
                "shard_size": args.shard_size,
            },
            "filter": {"shard_size": args.shard_size, "dedup_rows_per_task": args.rows_per_task},
        }
    )
    stage = FilterStage(recipe, work)
    scanned = sorted(storage.list_names(storage.join(work, "filter", "_scan", "_ledger"), ".json"))
    raw = {name.removesuffix(".json"): f"unused/{name.removesuffix('.json')}.tar" for name in scanned}
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        ctx = RunContext(StageProgress(enabled=False), stage.fingerprint({}, {}))
        with WorkerRss() as workers:
            t0 = time.monotonic()
            ingest = IngestStage(recipe, work)
            planned = ingest._plan_lists(RunContext(ctx.progress, ingest.fingerprint({}, ingest.inspect_inputs())))
            plan_lists_s = time.monotonic() - t0
            t0 = time.monotonic()
            tasks, stats = stage.plan_output(ctx, raw)
            seconds = time.monotonic() - t0
    finally:
        ray.shutdown()
    dedup = storage.join(work, "filter", "_dedup")
    phases = {}
    for phase in [p for p in storage.list_names(dedup) if p != "_plan.json"] + ["../_decisions"]:
        records = Ledger(storage.join(dedup, phase)).done().values()
        phases[phase.removeprefix("../_")] = {
            "tasks": len(records),
            "task_s": round(sum(r.seconds for r in records), 2),
            "rows_out": sum(r.samples_out for r in records),
        }
    out = {
        "benchmark": "scale_data",
        "rows": args.rows,
        "raw_shards": len(raw),
        "rows_per_task": args.rows_per_task,
        "cpus": args.cpus,
        "seconds": round(seconds, 2),
        "plan_lists_s": round(plan_lists_s, 2),
        "input_shards_planned": len(planned["shards"]),
        "rows_per_s": round(args.rows / seconds),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "task_peak_rss_mb": round(workers.peak_bytes / 2**20, 1),
        "kept": stats["samples_out"],
        "drops": {k: v for k, v in stats["counts"].items() if v},
        "dedup_tasks": sum(p["tasks"] for p in phases.values()),
        "phases": phases,
        "output_shards_planned": len(tasks),
        "generate_s": round(generate_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    storage.remove_tree(work)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
