"""What resuming on another world size costs each rank and each node: a ZeRO checkpoint written by
N ranks, converted (`pipeline.train.reshard.convert`, one task per old rank), then loaded by M ranks
for two M. Per rank: the bytes it fetched and the bytes it left on local disk; per conversion task:
the bytes it read and wrote. JSON.

    .venv/bin/python benchmarks/reshard.py --old-world 4 --new-worlds 1 2 [--zero-stage 3] [--layers 8]

Both falling as 1/M is the claim (DeepSpeed's universal checkpoint had every new rank copy all the
states: 16 bytes a parameter with the EMA, whatever M). Ranks are gloo processes on this machine;
the checkpoint is on the local filesystem, read through the same fsspec range requests as on S3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_loop import PARTITION_ALL, encoded_shards, loop_spec, run_ranks  # noqa: E402

from pipeline.config.models import TransformerTrainConfig  # noqa: E402
from pipeline.models.transformer import DalleConfig, param_count  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _disk_bytes(folder: str) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _load_rank(rank: int, world: int, port: int, spec, url: str, out: str) -> None:
    """One rank of the new world: the engine built as for a fresh run, then the converted states."""
    import torch.distributed as dist

    scratch = tempfile.mkdtemp(prefix=f"rank{rank}-", dir=out)  # this rank's local disk
    os.environ.update(DS_ACCELERATOR="cpu", TMPDIR=scratch, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    tempfile.tempdir = scratch
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from pipeline.train import reshard
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine, build_model
    from pipeline.train.loop import load_task

    slots = spec.train.workers * spec.train.grad_accum  # the run's micro-batches per update
    cfg = spec.train.model_copy(update={"workers": world, "grad_accum": slots // world})
    task = load_task(spec.task, spec.config)
    engine = build_engine(build_model(task.build_model, cfg, world, False), cfg, world, False)
    ema = EMA(engine.module, cfg.ema_decay, rank, world)
    fetched = reshard.load(engine, ema, url, rank, world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"fetched_bytes": fetched, "local_disk_bytes": _disk_bytes(scratch)}, f)
    dist.destroy_process_group()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-world", type=int, default=4)
    p.add_argument("--new-worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--zero-stage", type=int, default=3, choices=[1, 2, 3])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="reshard-"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = DalleConfig(
        layers=args.layers, heads=4, head_dim=32, text_len=16, text_vocab=512, image_grid=8, image_vocab=512
    )
    spans = encoded_shards(out / "data", model, samples=4 * args.old_world + 4, per_shard=8)
    train = TransformerTrainConfig(
        steps=1, batch_size=1, workers=args.old_world, zero_stage=args.zero_stage, ema_decay=0.9,
        checkpoint_every=1, log_every=1, deepspeed=PARTITION_ALL if args.zero_stage == 3 else {},
    )  # fmt: skip
    spec = loop_spec(str(out / "run"), spans, model, train, holdout=4, use_gpu=False)
    run_ranks(spec, args.old_world, on_gpu=False)
    url = str(out / "run" / "_train" / "run" / "checkpoint_00000001")

    from pipeline.train import reshard

    sizes = {}

    def tasks(fn, arg_list):  # one conversion task per old rank, each measured
        results = []
        for url_, rank, world_ in arg_list:
            read = sum(
                os.path.getsize(os.path.join(url_, f))
                for f in (f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"ema/rank_{rank:05d}.pt")
            )
            results.append(fn(url_, rank, world_))
            sizes[rank] = {"read_bytes": read, "written_bytes": results[-1]}
        return results

    reshard.convert(url, args.old_world, tasks)
    whole = sum(s["written_bytes"] for s in sizes.values())
    report = {
        "benchmark": "reshard",
        "params": param_count(model),
        "zero_stage": args.zero_stage,
        "old_world": args.old_world,
        "states_bytes": whole,
        "conversion_tasks": sizes,
        "new_worlds": {},
    }
    import torch.multiprocessing as mp

    for world in args.new_worlds:
        folder = out / f"load-{world}"
        folder.mkdir()
        mp.spawn(_load_rank, args=(world, _free_port(), spec, url, str(folder)), nprocs=world, join=True)
        ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
        report["new_worlds"][world] = {
            "fetched_bytes_per_rank": [r["fetched_bytes"] for r in ranks],
            "local_disk_bytes_per_rank": [r["local_disk_bytes"] for r in ranks],
            "largest_rank_share_of_states": max(r["fetched_bytes"] for r in ranks) / whole,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
