"""The training loop every Ray Train worker runs, for any model given as a `TrainTask`.

A task says how to build the model, decode and collate samples, compute the loss of a batch at a
step, evaluate on held-out samples and export the final weights; this loop does the rest: the
DeepSpeed engine, the learning-rate schedule, the resumable data stream, per-step noise seeded
from (seed, step, rank) so a resumed run draws the same noise, the sharded EMA, metrics,
checkpoints.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import TrainConfig
from pipeline.data.loader import ShardStream, read_span, split_holdout
from pipeline.data.shards import Sample
from pipeline.engine.ledger import Ledger

log = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What a trained model contributes to the loop (constructed with its stage config dict).
    Optional: `tokens_per_sample` and `flops_per_token` attributes (for tokens/s and MFU)."""

    def build_model(self) -> nn.Module: ...

    def decode(self, sample: Sample) -> Any:
        """One shard sample -> what `collate` takes (runs in the data path, CPU)."""

    def collate(self, items: list[Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]: ...

    def loss(
        self, engine, batch: dict[str, torch.Tensor], step: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(
        self, model: nn.Module, held: list[Any], device: torch.device
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics and uint8 image grids on the held-out samples: on every rank with the engine's
        module (a ZeRO-3 forward is collective), and on rank 0 with the gathered EMA weights."""

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        """Writes the final weights under `out_url`; returns the file names."""


def load_task(path: str, config: dict[str, Any]) -> TrainTask:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)(config)


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63)


class KeyedDecode:
    """Decodes a sample and keeps its key beside it (picklable for DataLoader workers)."""

    def __init__(self, task: TrainTask):
        self.task = task

    def __call__(self, sample: Sample) -> tuple[str, Any]:
        return sample["__key__"], self.task.decode(sample)


def _mean_across_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


@dataclass(frozen=True)
class TrainSpec:
    """What every training worker is given (built by `pipeline.train.trainer.fit`)."""

    task: str
    """The `TrainTask` as "module:Class"."""
    config: dict[str, Any]
    """The task's config, as JSON (the checkpoint keeps it beside the task to rebuild the model)."""
    train: TrainConfig
    data_url: str
    """The stage whose committed shards are trained on."""
    holdout: int
    """Samples (the last in shard order) kept out of training for evaluation."""
    out_url: str
    """Where rank 0 exports the final weights."""
    run_url: str
    """The trained stage's folder (its `_train/` run, metrics and W&B files)."""
    name: str
    """The W&B run's name."""
    use_gpu: bool

    def tracked(self) -> dict[str, Any]:
        """The spec as the W&B run's config."""
        return {**asdict(self), "train": self.train.model_dump(mode="json")}


def train_worker(spec: TrainSpec) -> None:
    """Ray Train's `train_loop_per_worker`."""
    on_gpu = spec.use_gpu and torch.cuda.is_available()
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train
    import ray.train.torch

    from pipeline.observe.tracking import Tracker, new_run_id
    from pipeline.train import checkpoint, throughput
    from pipeline.train.ema import EMA
    from pipeline.train.engine import autocast_dtype, build_engine, loss_scale, set_lr
    from pipeline.train.paths import progress_url, run_storage, sample_keys_url
    from pipeline.train.schedules import learning_rate

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = spec.train
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    dtype = autocast_dtype(cfg, on_gpu)
    task = load_task(spec.task, spec.config)

    torch.manual_seed(cfg.seed)
    engine = build_engine(task.build_model(), cfg, world, on_gpu)
    ema = EMA(engine.module, cfg.ema_decay, rank, world) if cfg.ema_decay is not None else None
    fresh = {"step": 0, "run_id": new_run_id(), "world": world}
    state = checkpoint.load(engine, ema, world, run_storage(spec.run_url)) or fresh
    step = state["step"]

    tracker = None
    if rank == 0:
        tracker = Tracker(
            spec.run_url, run_id=state["run_id"], name=spec.name, project=cfg.wandb_project, config=spec.tracked()
        )
        tracker.truncate(step)
        if step:
            tracker.log({"resumed_from": step}, step)
    train_spans, held_spans = split_holdout(Ledger(spec.data_url).spans(), spec.holdout)
    stream = ShardStream(train_spans, rank=rank, world=world, seed=cfg.seed, decode=KeyedDecode(task))
    held = [task.decode(s) for span in held_spans for s in read_span(span)]
    per_step = cfg.batch_size * cfg.grad_accum
    batches = stream.batches(cfg.batch_size, position=step * per_step, workers=cfg.loader_workers)
    if step:
        log.info("rank %d resumes at step %d (sample %d)", rank, step, step * per_step)
    peak = throughput.peak_flops(device, cfg.precision if on_gpu else "fp32")
    keys_url = sample_keys_url(spec.run_url, rank)

    window: list[dict[str, float]] = []
    keys: list[list[str]] = []
    ema_model, ema_step = None, -1  # the gathered EMA of the last evaluation, reused for the export
    started, window_start = time.monotonic(), step
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        set_lr(engine, lr)
        step_keys: list[str] = []
        for micro in range(cfg.grad_accum):
            keyed = next(batches)
            step_keys += [key for key, _ in keyed]
            batch = task.collate([item for _, item in keyed], device, dtype)
            generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank, micro))
            loss, metrics = task.loss(engine, batch, step, generator)
            engine.backward(loss)
            engine.step()
            window.append({"loss": float(loss.detach()), **metrics})
        keys.append(step_keys)
        step += 1
        if ema is not None:
            ema.update(engine.module)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            metrics = _mean_across_ranks(metrics, device)
            seconds = time.monotonic() - started
            samples_per_s = (step - window_start) * per_step * world / max(seconds, 1e-9)
            metrics.update(lr=lr, samples_per_s=samples_per_s, **throughput.memory_gb(device))
            if hasattr(task, "tokens_per_sample"):
                metrics.update(
                    throughput.rates(samples_per_s, task.tokens_per_sample, task.flops_per_token, world, peak)
                )
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            scale = loss_scale(engine)
            if scale is not None:
                metrics["loss_scale"] = scale
            window, started, window_start = [], time.monotonic(), step
            if tracker is not None:
                tracker.log(metrics, step)
                progress = {"step": step, "steps": cfg.steps, "samples_per_s": samples_per_s}
                storage.write_json(progress_url(spec.run_url), progress)
        if step % cfg.checkpoint_every == 0 or last:
            if ema is not None:
                ema_model, ema_step = _whole_model(engine, ema, task), step
            scores, images = _evaluate(engine, ema_model, task, held, device)
            if tracker is not None:
                tracker.log(scores, step)
                tracker.log_images(images, step)
                tracker.flush()
            if cfg.log_sample_keys:  # written before the checkpoint: a rerun rewrites the same file
                storage.write_json(storage.join(keys_url, f"{step:08d}.json"), {"last_step": step, "keys": keys})
            keys = []
            state = {**state, "step": step, "samples_per_rank": step * per_step}
            task_spec = {"task": spec.task, "config": spec.config}
            checkpoint.save(engine, ema, state, task_spec, {"step": step}, rank)

    model = ema_model if ema_step == step else _whole_model(engine, ema, task)
    if rank == 0:
        task.export(model, spec.out_url)
        tracker.finish()


def _whole_model(engine, ema, task: TrainTask) -> nn.Module | None:
    """The weights to evaluate and export as a plain module on rank 0 (None elsewhere): the
    EMA's when kept, else the engine's, gathered from the partitions. Collective."""
    from pipeline.train.weights import live_state, load_weights

    state = live_state(engine, ema)
    if state is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building must not move the global RNG
        model = task.build_model()
    return load_weights(model, state).to(engine.device).eval()


def _evaluate(engine, ema_model: nn.Module | None, task: TrainTask, held: list[Any], device: torch.device):
    """Held-out metrics and images (meaningful on rank 0): the engine's, measured on every rank
    (a ZeRO-3 forward is collective), and with an EMA also those of its gathered weights (rank 0
    only, the others hold None), prefixed `ema_` (its images are the ones shown)."""
    engine.module.eval()
    try:
        scores, images = task.evaluate(engine.module, held, device)
    finally:
        engine.module.train()
    if ema_model is not None:
        ema_scores, images = task.evaluate(ema_model, held, device)
        scores = {**scores, **{f"ema_{k}": v for k, v in ema_scores.items()}}
    return scores, images
