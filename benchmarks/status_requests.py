"""What one `dalle status --json` costs on object storage, for a stage of many committed shards.

    python benchmarks/status_requests.py [--shards 25000] [--json]

Starts moto's S3 server on 127.0.0.1 behind a request counter, writes an `ingest` stage of
`--shards` committed shards there (records, plan, done, and the ledger summary the driver
compacts), and runs `dalle status --json` on the demo recipe pointed at it twice: with the summary
(as a finished or running stage has it), and with the summary deleted (as ledgers written before
it existed). Prints JSON: shards, and per case the HTTP requests the server saw and the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from storage import moto_bucket  # benchmarks/storage.py

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=25_000)
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    args = ap.parse_args()

    counter = {"requests": 0}
    bucket, env, server = moto_bucket(counter)
    from pipeline import storage
    from pipeline.engine.ledger import Ledger, ShardRecord

    out = f"s3://{bucket}/status"
    stage = storage.join(out, "ingest")
    ledger = Ledger(stage)
    records = {
        f"{i:05d}": ShardRecord(f"{i:05d}", 10_000, 9_000, (f"{i:05d}.tar",), "c" * 64, "f", {"http_4xx": 1000}, 60.0)
        for i in range(args.shards)
    }
    started = time.monotonic()
    fs, _ = storage.get_fs(stage)
    body = {
        storage.get_fs(ledger.path("_ledger", f"{s}.json"))[1]: storage.dumps({**r.__dict__, "files": list(r.files)})
        for s, r in records.items()
    }
    fs.pipe(body)
    storage.write_json(ledger.path("_fingerprint.json"), {"stage": "ingest", "config": {}, "inputs": {}})
    storage.write_json(ledger.path("_plan.json"), {"shards": args.shards})
    storage.write_json(ledger.path("_done.json"), {"samples_in": args.shards * 10_000, "finished_at": time.time()})
    ledger.compact(records, total=args.shards)
    write_s = time.monotonic() - started

    recipe = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    recipe["output_dir"] = out
    path = Path(tempfile.mkdtemp(prefix="bench-status-")) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cases = {}
    try:
        for case in ("compacted", "no_summary"):
            if case == "no_summary":
                fs.rm(storage.get_fs(ledger.path("_ledger", "_summary.parquet"))[1])
            counter["requests"] = 0
            t0 = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "status", str(path), "--json"],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, **env},
                timeout=1800,
            )
            seconds = time.monotonic() - t0
            if result.returncode:
                sys.exit(f"status_requests: dalle status failed: {result.stderr.strip()[-500:]}")
            row = json.loads(result.stdout)[0]
            assert row["shards_done"] == args.shards, row
            cases[case] = {"requests": counter["requests"], "seconds": round(seconds, 2)}
    finally:
        server.stop()
    report = {
        "benchmark": "status_requests",
        "shards": args.shards,
        **{f"{case}_{k}": v for case, figures in cases.items() for k, v in figures.items()},
        "setup_s": round(write_s, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
