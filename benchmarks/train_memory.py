"""Peak host memory of each training rank while it builds, trains, evaluates, checkpoints and exports,
next to `dalle plan`'s prediction for the same setup (CPU, gloo, DeepSpeed ZeRO-3 with the EMA).

    python benchmarks/train_memory.py PRESET --workers N [--layers L] [--heads H] [--zero 3]
        [--steps 2] [--text-len 32] [--grid 8] [--json]

    make bench runs `small` (≈123M parameters, DeepSpeed's default buckets) and `small --layers 24
    --heads 16 --reduce-bucket 5e7` (≈350M parameters; the smaller reduce bucket keeps two ranks
    inside a 24 GB machine), each with 1 and 2 workers.

Each rank is a process (torch.multiprocessing, gloo on 127.0.0.1) running the train stage's own
pieces without Ray: `build_model` (under `deepspeed.zero.Init` for ZeRO-3), `build_engine`, the
sharded EMA, `evaluate_with_ema` on its share of a held-out set, a DeepSpeed checkpoint save with
its EMA shard, and the streamed safetensors export (`TransformerTask.export_tensors`, rank 0
writing). A thread samples the rank's resident set every 5 ms and keeps the peak of each phase.
The sequence is shortened (`--text-len`, `--grid`) so a step takes seconds on 2 cores; model
states do not depend on it.

Prints JSON: workers, params, peak_rss_gb (the largest rank's peak over all phases), phases (that
peak per phase), ranks (every rank's), plan_host_gb_per_rank (the plan's device terms for CPU ranks,
which are host memory there, plus a CPU process's baseline) and plan_error (relative to the measured
peak).
Run `--workers 1` and `--workers 2` to see the model states halve.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

PHASES = ("build", "train", "evaluate", "checkpoint", "export")
CPU_PROCESS_GB = 0.8
"""Resident set of a CPU rank before any model: Python, torch, DeepSpeed and gloo (measured ~0.7 GB)."""


class PeakSampler:
    """The peak resident set of this process per phase, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss / 1024**3
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            time.sleep(0.005)

    def enter(self, phase: str) -> None:
        time.sleep(0.01)
        self.phase = phase

    def stop(self) -> dict[str, float]:
        time.sleep(0.01)
        self._stop.set()
        self._thread.join()
        return self.peaks


def _model_config(args):
    from pipeline.models.transformer import preset

    sizes = {k: v for k, v in (("layers", args.layers), ("heads", args.heads)) if v is not None}
    return preset(args.preset, text_len=args.text_len, image_grid=args.grid, checkpoint_activations=False, **sizes)


def _train_config(args):
    from pipeline.config.models import TrainConfig

    return TrainConfig(
        workers=args.workers,
        steps=args.steps,
        batch_size=1,
        zero_stage=args.zero,
        ema_decay=0.99,
        lr=1e-4,
        deepspeed=_deepspeed(args),
    )


def _deepspeed(args) -> dict:
    """The raw DeepSpeed keys of the run (and of the plan's prediction): `--reduce-bucket`."""
    if args.reduce_bucket is None:
        return {}
    return {"zero_optimization": {"reduce_bucket_size": args.reduce_bucket}}


def _rank(rank: int, args, port: int, out: str, results) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from pipeline.stages.train_task import TransformerTask
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine, build_model
    from pipeline.train.evaluation import evaluate_with_ema, share

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.workers))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_SIZE=str(args.workers))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.workers))
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    sampler = PeakSampler()
    cfg, model_cfg = _train_config(args), _model_config(args)
    task = TransformerTask({"model": model_cfg.to_dict(), "eval_batch_size": 2})
    rng = np.random.default_rng(rank)

    def sample():
        text = rng.integers(1, model_cfg.text_vocab, model_cfg.text_len)
        return text, rng.integers(0, model_cfg.image_vocab, model_cfg.image_len)

    sampler.enter("build")
    torch.manual_seed(0)
    engine = build_engine(build_model(task.build_model, cfg, args.workers, False), cfg, args.workers, False)
    ema = EMA(engine.module, cfg.ema_decay, rank, args.workers)
    sampler.enter("train")
    for step in range(args.steps):
        batch = task.collate([sample()], torch.device("cpu"), None)
        loss, _ = task.loss(engine, batch, step, torch.Generator())
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
    sampler.enter("evaluate")
    held = [sample() for _ in range(4)]
    part, real = share(held, rank, args.workers)
    evaluate_with_ema(task, engine, ema, part, real, torch.device("cpu"))
    sampler.enter("checkpoint")
    folder = os.path.join(out, "checkpoint")
    engine.save_checkpoint(folder, tag="deepspeed")
    os.makedirs(os.path.join(folder, "ema"), exist_ok=True)
    torch.save(ema.state_dict(), os.path.join(folder, "ema", f"rank_{rank:05d}.pt"))
    dist.barrier()
    sampler.enter("export")
    tensors = ema.full_tensors()
    if rank == 0:
        task.export_tensors(tensors, os.path.join(out, "export"))
    for _ in tensors:
        pass
    dist.barrier()
    results[rank] = sampler.stop()
    dist.destroy_process_group()
    os._exit(0)  # the figures are in; a joinable native thread (gloo, DeepSpeed's comm op) can abort teardown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_host_gb_per_rank(args) -> float:
    """`dalle plan`'s per-rank prediction for this CPU run: its per-GPU terms (states, runtime terms,
    activations: on CPU they live in host memory) plus a CPU process's baseline. Planned for CPU ranks,
    where an allocated buffer is resident only as far as it is written (DeepSpeed's 5e8-element reduce
    buffer, which a GPU reserves whole, costs a smaller model only what its gradients fill)."""
    from pipeline.commands.plan import ModelShape, PlanRequest, plan
    from pipeline.commands.plan_runtime import RuntimeRequest

    shape = ModelShape.of(_model_config(args))
    request = PlanRequest(
        gpus=args.workers, gpu_mem_gb=1e6, micro_batch=1, precision="fp32", zero_stage=args.zero, gpus_per_node=8
    )
    run = RuntimeRequest(ema=True, deepspeed=_deepspeed(args), accelerator="cpu")
    return plan(shape, request, run)["gpu_peak_gb"] + CPU_PROCESS_GB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--zero", type=int, default=3, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--layers", type=int, help="overrides the preset's layers")
    parser.add_argument("--heads", type=int, help="overrides the preset's heads (x 64 wide)")
    parser.add_argument("--reduce-bucket", type=float, help="ZeRO's reduce_bucket_size (default DeepSpeed's 5e8)")
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    import torch.multiprocessing as mp

    from pipeline.models.transformer import param_count

    with tempfile.TemporaryDirectory(prefix="train-memory-") as out:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_rank, args=(args, _free_port(), out, results), nprocs=args.workers, join=True)
        ranks = [dict(results[r]) for r in range(args.workers)]
    phases = {p: max(r.get(p, 0.0) for r in ranks) for p in PHASES}
    peak = max(phases.values())
    predicted = plan_host_gb_per_rank(args)
    report = {
        "preset": args.preset,
        "workers": args.workers,
        "zero_stage": args.zero,
        "params": param_count(_model_config(args)),
        "peak_rss_gb": round(peak, 3),
        "phases": {k: round(v, 3) for k, v in phases.items()},
        "ranks": [{k: round(v, 3) for k, v in r.items()} for r in ranks],
        "plan_host_gb_per_rank": round(predicted, 3),
        "plan_error": round(predicted / peak - 1, 3),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
