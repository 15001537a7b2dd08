"""The train stage's own loop (`pipeline.train.loop.run`), without Ray, through everything a
multi-GPU run meets between two updates: ZeRO-3 with every parameter partitioned (persistence
threshold 0, so parameters are fetched and released around each module), the sharded EMA,
`compile: auto`, the collectives of the held-out evaluation and the metrics, checkpoints, the
streamed export, and a resume. A run of S updates is compared with one stopped at its middle
checkpoint and resumed: the same losses, the same held-out figures, the same exported weights.

    python benchmarks/train_loop.py --out DIR                        # a GPU: an NCCL group of one
    .venv/bin/python benchmarks/train_loop.py --out DIR --ranks 2 --tiny   # CPU: two gloo ranks

Each rank is a process of its own group (NCCL on a GPU, gloo on CPU), started by
`torch.multiprocessing.spawn`; a group of one is still a group, so every collective of the loop
runs. The data is random tokens of the recipe's geometry in encoded-shard tars. Prints JSON: the
seconds of each run, the losses, the largest difference between the runs, the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config.models import TransformerTrainConfig
from pipeline.data.loader import ShardSpan, split_holdout
from pipeline.data.shards import npy_bytes, write_tar
from pipeline.models.transformer import DalleConfig
from pipeline.train.loop import TrainSpec

TASK = "pipeline.stages.train_task:TransformerTask"
PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
"""DeepSpeed keeps parameters under 1e5 elements whole on every rank by default: the small test
models would then never be fetched or released. Threshold 0 partitions every one, as at 12B."""


def encoded_shards(folder: Path, cfg: DalleConfig, samples: int, per_shard: int, seed: int = 0) -> list[ShardSpan]:
    """Tars of `samples` random encoded samples (text and image tokens, a caption), as the encode
    stage writes them, and their spans."""
    rng = np.random.default_rng(seed)
    spans = []
    for first in range(0, samples, per_shard):
        rows = []
        for i in range(first, min(first + per_shard, samples)):
            text = np.zeros(cfg.text_len, dtype=np.int32)
            length = int(rng.integers(2, cfg.text_len + 1))
            text[:length] = rng.integers(1, cfg.text_vocab, length)
            image = rng.integers(0, cfg.image_vocab, cfg.image_len).astype(np.uint16)
            rows.append(
                {
                    "__key__": f"{i:06d}",
                    "txt": f"sample {i}",
                    "text_tokens.npy": npy_bytes(text),
                    "image_tokens.npy": npy_bytes(image),
                }
            )
        url = str(folder / f"{first // per_shard:05d}.tar")
        write_tar(url, rows)
        spans.append(ShardSpan(url, len(rows)))
    return spans


def loop_spec(
    run_url: str,
    spans: list[ShardSpan],
    model: DalleConfig,
    train: TransformerTrainConfig,
    *,
    holdout: int,
    use_gpu: bool,
) -> TrainSpec:
    """What the train stage hands every worker, for `spans` with the last `holdout` samples held out."""
    train_spans, held_spans = split_holdout(spans, holdout)
    config = {"model": model.to_dict(), "eval_batch_size": 4, "export_precision": "fp32", "seed": train.seed}
    return TrainSpec(
        task=TASK,
        config=config,
        train=train,
        train_spans=train_spans,
        held_spans=held_spans,
        out_url=os.path.join(run_url, "export"),
        run_url=run_url,
        name="train-loop",
        use_gpu=use_gpu,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, spec: TrainSpec, on_gpu: bool) -> None:
    import torch.distributed as dist

    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), WANDB_MODE="disabled")
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo", rank=rank, world_size=world, device_id=device if on_gpu else None
    )
    from pipeline.train.loop import run
    from pipeline.train.paths import run_storage
    from pipeline.train.session import TorchSession

    engine = run(spec, TorchSession(run_storage(spec.run_url), spec.train.keep_checkpoints), device)
    held = {  # ZeRO-3: the partition, the whole, kept whole; other stages hold every parameter whole
        n: [p.ds_tensor.numel(), p.ds_numel, bool(p.ds_persist)]
        if hasattr(p, "ds_tensor")
        else [p.numel()] * 2 + [True]
        for n, p in engine.module.named_parameters()
    }
    with open(os.path.join(spec.run_url, f"partitions_rank{rank}.json"), "w") as f:
        json.dump(held, f)  # what this rank held of each parameter: its partition, the whole, kept whole
    dist.destroy_process_group()
    # the rank's results are on disk; a joinable native thread (gloo, DeepSpeed) can abort the
    # interpreter's teardown, which spawn would report as a failed rank
    os._exit(0)


def run_ranks(spec: TrainSpec, world: int, on_gpu: bool, kill_after: int | None = None) -> float:
    """Runs the loop on `world` spawned ranks; returns the seconds it took. With `kill_after`, every
    rank is SIGKILLed as soon as the checkpoint of that step is complete (a crash, not a stop)."""
    import signal

    import torch.multiprocessing as mp

    from pipeline.train import checkpoint
    from pipeline.train.paths import run_storage
    from pipeline.train.trainer import prepare_resume

    started = time.monotonic()
    # what the driver does before Ray Train starts the workers: a run resumed on another world size
    # has its newest checkpoint converted, one task per old rank (here in turn, in this process)
    workers = spec.train.model_copy(update={"workers": world})
    prepare_resume("train", run_storage(spec.run_url), workers, run_tasks=lambda fn, args: [fn(*a) for a in args])
    ranks = mp.spawn(_rank, args=(world, _free_port(), spec, on_gpu), nprocs=world, join=False)
    target = os.path.join(run_storage(spec.run_url), f"{checkpoint.PREFIX}{kill_after or 0:08d}")
    while not ranks.join(timeout=0.05):
        if kill_after is not None and os.path.exists(target) and checkpoint.problem(target) is None:
            for process in ranks.processes:
                os.kill(process.pid, signal.SIGKILL)
            for process in ranks.processes:
                process.join()
            break
    return time.monotonic() - started


def losses(run_url: str) -> dict[int, dict[str, float]]:
    """Each logged step's figures from the run's `metrics.jsonl`."""
    from pipeline.observe.tracking import read_metrics

    out: dict[int, dict[str, float]] = {}
    for line in read_metrics(os.path.join(run_url, "metrics.jsonl")):
        out.setdefault(line["step"], {}).update({k: v for k, v in line.items() if k != "time"})
    return out


def partitions(run_url: str, rank: int) -> dict[str, list]:
    """{parameter: [elements rank `rank` held, elements in all, kept whole on every rank]}."""
    with open(os.path.join(run_url, f"partitions_rank{rank}.json")) as f:
        return json.load(f)


def exported(run_url: str) -> dict[str, torch.Tensor]:
    from pipeline.models.weight_files import iter_tensors

    return dict(iter_tensors(os.path.join(run_url, "export"), "cpu", None))


COMPARED = ("loss", "text_loss", "image_loss", "heldout_loss", "ema_heldout_loss")


def largest_difference(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], steps) -> float:
    """The largest relative difference of the compared figures at `steps` between two runs."""
    worst = 0.0
    for step in steps:
        for key in COMPARED:
            if key in a.get(step, {}) or key in b.get(step, {}):
                x, y = a[step][key], b[step][key]
                worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="updates of the whole run (even)")
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model and batch")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    on_gpu = torch.cuda.is_available()
    if args.tiny:
        model = DalleConfig(layers=2, heads=2, head_dim=16, text_len=16, text_vocab=64, image_grid=4, image_vocab=32)
        batch, samples = 4, 40
    else:  # the demo preset's width at the paper's image geometry: every mask kind, 1280 positions
        model = DalleConfig(
            layers=8, heads=8, head_dim=64, text_len=256, text_vocab=16384, image_grid=32, image_vocab=8192
        )
        batch, samples = 8, 24 * args.ranks * 8
    spans = encoded_shards(out / "data", model, samples, per_shard=max(8, samples // 4))
    half = args.steps // 2
    train = TransformerTrainConfig(
        steps=args.steps, batch_size=batch, lr=1e-3, warmup_steps=1, zero_stage=3, ema_decay=0.9, grad_clip=1.0,
        checkpoint_every=half, log_every=1, keep_checkpoints=2, deepspeed=PARTITION_ALL,
    )  # fmt: skip
    whole = str(out / "whole")
    seconds = {"whole": run_ranks(loop_spec(whole, spans, model, train, holdout=8, use_gpu=on_gpu), args.ranks, on_gpu)}
    resumed = str(out / "resumed")
    spec = loop_spec(resumed, spans, model, train, holdout=8, use_gpu=on_gpu)
    seconds["killed_after_half"] = run_ranks(spec, args.ranks, on_gpu, kill_after=half)
    seconds["resumed"] = run_ranks(spec, args.ranks, on_gpu)
    a, b = losses(whole), losses(resumed)
    weights_a, weights_b = exported(whole), exported(resumed)
    report = {
        "benchmark": "train_loop",
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "ranks": args.ranks,
        "steps": args.steps,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "resumed_from": [line["resumed_from"] for line in b.values() if "resumed_from" in line],
        "losses": {step: a[step]["loss"] for step in sorted(a) if "loss" in a[step]},
        "heldout_loss": a[args.steps].get("heldout_loss"),
        "largest_rel_difference": largest_difference(a, b, range(1, args.steps + 1)),
        "largest_weight_difference": max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a),
        "parameters_kept_whole": sum(persist for _, _, persist in partitions(whole, 0).values()),
    }
    # CPU runs are bit-exact; on a GPU bf16 kernels may reduce in another order after a restart
    tolerance = 2e-2 if on_gpu else 1e-6
    report["resume_matches"] = report["largest_rel_difference"] <= tolerance and report["resumed_from"] == [half]
    print(json.dumps(report, indent=2))
    if not report["resume_matches"]:
        raise SystemExit(
            f"the resumed run differs from the uninterrupted one (relative {report['largest_rel_difference']:.2e})"
        )


if __name__ == "__main__":
    main()
