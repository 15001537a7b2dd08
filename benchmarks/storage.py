"""Local disk against S3: the same recipe run twice in one go, once with `output_dir` on local disk
and once on an S3 endpoint, each stage's wall time and the S3/local ratio, as JSON.

    .venv/bin/python benchmarks/storage.py [key=value ...]            # moto's server on 127.0.0.1
    AWS_ENDPOINT_URL=... .venv/bin/python benchmarks/storage.py --bucket my-bucket/prefix

Without `--bucket` it starts moto's S3 server on loopback (a real HTTP endpoint, but in-memory and
on the same 2 cores as the run, so it measures the protocol's and s3fs's overhead, not a real
network). The recipe is `jobs/demo.yaml` at the test size unless overrides say otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "ingest.synthetic.count=300",
    "ingest.shard_size=50",
    "dvae.train.steps=60",
    "dvae.train.checkpoint_every=30",
    "clip.train.steps=20",
    "clip.train.checkpoint_every=10",
    "transformer.train.steps=40",
    "transformer.train.checkpoint_every=20",
    "sample=null",
    "evaluate=null",
]


def run(output_dir: str, overrides: list[str], env: dict[str, str]) -> dict:
    """Runs the recipe into `output_dir`; each stage's seconds and the whole command's."""
    from pipeline import storage

    cmd = [sys.executable, "-m", "pipeline.cli", "run", "jobs/demo.yaml", f"output_dir={output_dir}"]
    started = time.monotonic()
    result = subprocess.run([*cmd, *overrides, "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"storage benchmark: the run into {output_dir} failed: {result.stderr.strip().splitlines()[-1]}")
    seconds = {}
    for stage in ("ingest", "filter", "text-tokenizer", "dvae", "clip", "encode", "train"):
        done = storage.read_json_or_none(storage.join(output_dir, stage, "_done.json"))
        if done is not None:
            seconds[stage] = round(done["seconds"], 2)
    return {"stages": seconds, "total": round(time.monotonic() - started, 2)}


def moto_bucket(counter: dict[str, int] | None = None) -> tuple[str, dict[str, str], object]:
    """moto's S3 server on 127.0.0.1 with an empty bucket, reached through the AWS environment
    variables (set here): (bucket, env, server). With `counter`, every HTTP request it answers
    adds one to `counter["requests"]`."""
    import threading

    import boto3

    from pipeline.synthetic.s3_server import CLEARED, client_env, start_s3_server

    lock = threading.Lock()

    def count(method: str, path: str) -> None:
        if counter is not None:
            with lock:
                counter["requests"] = counter.get("requests", 0) + 1

    server = start_s3_server(count)
    env = client_env(server)
    os.environ.update(env)
    for name in CLEARED:
        os.environ.pop(name, None)
    boto3.client("s3").create_bucket(Bucket="bench")
    return "bench", env, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides (default: the test-size demo)")
    parser.add_argument("--bucket", help="bucket/prefix on the S3 endpoint of the environment (default: moto)")
    args = parser.parse_args()
    overrides = args.overrides or SMALL
    server = None
    if args.bucket:
        bucket, env = args.bucket, {}
    else:
        bucket, env, server = moto_bucket()
    env = {**os.environ, **env, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
            local = run(str(Path(tmp) / "out"), overrides, env)
            s3 = run(f"s3://{bucket}/storage-bench-{stamp}", overrides, env)
    finally:
        if server is not None:
            server.stop()
    ratio = {k: round(s3["stages"][k] / v, 2) for k, v in local["stages"].items() if v and k in s3["stages"]}
    print(
        json.dumps(
            {
                "endpoint": "moto on 127.0.0.1" if server else os.environ.get("AWS_ENDPOINT_URL", "AWS"),
                "overrides": overrides,
                "local_s": local,
                "s3_s": s3,
                "s3_over_local": {**ratio, "total": round(s3["total"] / local["total"], 2)},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
