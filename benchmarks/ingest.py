"""Ingest throughput: our ingest stage vs img2dataset run directly, same URL list, same server.

    python benchmarks/ingest.py [--count 2000] [--shard-size 250] [--threads 16] [--processes 2]

Both download the synthetic set (with its crawl defects) from one loopback server with the same
image size, resize mode, shard size, threads and parallelism (our Ray tasks vs img2dataset's
processes). Prints JSON: images/s of each (successful images over wall time) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its update check reaches for the network
    import img2dataset

    from pipeline import workflow
    from pipeline.config.data import SyntheticConfig
    from pipeline.config.recipe import build_recipe
    from pipeline.synthetic.dataset import generate, url_list_rows
    from pipeline.synthetic.server import LoopbackServer, dead_url

    dataset = generate(SyntheticConfig(count=args.count, seed=1))
    work = tempfile.mkdtemp(prefix="bench-ingest-")
    with LoopbackServer(dataset.files) as server:
        rows = url_list_rows(dataset, server.url, dead_url())
        url_list = os.path.join(work, "urls.parquet")
        pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"]} for r in rows]), url_list)

        recipe = build_recipe(
            {
                "name": "bench",
                "output_dir": os.path.join(work, "ours"),
                "ray": {"num_cpus": args.processes},
                "ingest": {
                    "url_lists": [url_list],
                    "image_size": args.image_size,
                    "shard_size": args.shard_size,
                    "threads": args.threads,
                    "timeout_s": 5,
                    "allow_networks": ["127.0.0.1/32"],  # the loopback server; the check stays on
                },
            }
        )
        started = time.monotonic()
        ours = workflow.run(recipe, until="ingest", show_progress=False)["ingest"]
        ours_wall = time.monotonic() - started

        started = time.monotonic()
        img2dataset.download(
            url_list=url_list,
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            output_folder=os.path.join(work, "img2dataset"),
            output_format="webdataset",
            image_size=args.image_size,
            resize_mode="center_crop",
            number_sample_per_shard=args.shard_size,
            processes_count=args.processes,
            thread_count=args.threads,
            timeout=5,
            encode_quality=95,
            compute_hash="sha256",
            distributor="multiprocessing",
        )
        ref_wall = time.monotonic() - started
    ref_ok = 0
    for name in os.listdir(os.path.join(work, "img2dataset")):
        if name.endswith("_stats.json"):
            with open(os.path.join(work, "img2dataset", name)) as f:
                ref_ok += json.load(f)["successes"]

    ours_rate = ours["samples_out"] / ours["seconds"]
    ref_rate = ref_ok / ref_wall
    print(
        json.dumps(
            {
                "benchmark": "ingest",
                "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
                "rows": len(rows),
                "settings": vars(args),
                "ours": {
                    "images": ours["samples_out"],
                    "stage_seconds": round(ours["seconds"], 2),
                    "wall_seconds_with_ray_start": round(ours_wall, 2),
                    "images_per_s": round(ours_rate, 1),
                },
                "img2dataset": {
                    "images": ref_ok,
                    "wall_seconds": round(ref_wall, 2),
                    "images_per_s": round(ref_rate, 1),
                },
                "ratio_ours_over_img2dataset": round(ours_rate / ref_rate, 3),
                "ratio_with_ray_start": round(ours["samples_out"] / ours_wall / ref_rate, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
