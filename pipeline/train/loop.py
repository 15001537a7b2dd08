"""The training loop every Ray Train worker runs, for any model given as a `TrainTask`.

A task says how to build the model, decode and collate samples, compute the loss of a batch at a
step, evaluate on held-out samples and export the final weights; this loop does the rest: the
DeepSpeed engine, the learning-rate schedule, the resumable data stream, per-step noise seeded
from (seed, step, rank) so a resumed run draws the same noise, EMA, metrics, checkpoints.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config_models import TrainConfig
from pipeline.data.loader import ShardStream, ledger_spans, read_span, split_holdout
from pipeline.data.shards import Sample

log = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What a trained model contributes to the loop (constructed with its stage config dict)."""

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
        """Metrics and uint8 image grids on the held-out samples (rank 0, at checkpoints)."""

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        """Writes the final weights under `out_url`; returns the file names."""


def load_task(path: str, config: dict[str, Any]) -> TrainTask:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)(config)


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63)


def _mean_across_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def train_worker(spec: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`. `spec`: task, config, train, data_url, holdout,
    out_url, run_url, name, use_gpu (all plain values, built by `pipeline.train.trainer.fit`)."""
    on_gpu = bool(spec["use_gpu"]) and torch.cuda.is_available()
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train
    import ray.train.torch

    from pipeline.tracking import Tracker, new_run_id
    from pipeline.train import checkpoint
    from pipeline.train.ema import EMA
    from pipeline.train.engine import autocast_dtype, build_engine, set_lr
    from pipeline.train.schedules import learning_rate
    from pipeline.train.trainer import progress_url

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.model_validate(spec["train"])
    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    dtype = autocast_dtype(cfg, on_gpu)
    task = load_task(spec["task"], spec["config"])

    torch.manual_seed(cfg.seed)
    engine = build_engine(task.build_model(), cfg, world, on_gpu)
    ema = EMA(engine.module, cfg.ema_decay) if cfg.ema_decay is not None and rank == 0 else None
    state = checkpoint.load(engine, ema, world) or {"step": 0, "run_id": new_run_id(), "world": world}
    step = state["step"]

    tracker = None
    if rank == 0:
        tracker = Tracker(
            spec["run_url"], run_id=state["run_id"], name=spec["name"], project=cfg.wandb_project, config=spec
        )
        tracker.truncate(step)
        if step:
            tracker.log({"resumed_from": step}, step)
    train_spans, held_spans = split_holdout(ledger_spans(spec["data_url"]), spec["holdout"])
    stream = ShardStream(train_spans, rank=rank, world=world, seed=cfg.seed, decode=task.decode)
    held = [task.decode(s) for span in held_spans for s in read_span(span)] if rank == 0 else []
    per_step = cfg.batch_size * cfg.grad_accum
    batches = stream.batches(cfg.batch_size, position=step * per_step)
    if step:
        log.info("rank %d resumes at step %d (sample %d)", rank, step, step * per_step)

    window: list[dict[str, float]] = []
    started, window_start = time.monotonic(), step
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        set_lr(engine, lr)
        for micro in range(cfg.grad_accum):
            batch = task.collate(next(batches), device, dtype)
            generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, rank, micro))
            loss, metrics = task.loss(engine, batch, step, generator)
            engine.backward(loss)
            engine.step()
            window.append({"loss": float(loss.detach()), **metrics})
        step += 1
        if ema is not None:
            ema.update(engine.module)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            metrics = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            metrics = _mean_across_ranks(metrics, device)
            seconds = time.monotonic() - started
            metrics.update(lr=lr, samples_per_s=(step - window_start) * per_step * world / max(seconds, 1e-9))
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            window, started, window_start = [], time.monotonic(), step
            if tracker is not None:
                tracker.log(metrics, step)
                progress = {"step": step, "steps": cfg.steps, "samples_per_s": metrics["samples_per_s"]}
                storage.write_json(progress_url(spec["run_url"]), progress)
        if step % cfg.checkpoint_every == 0 or last:
            if tracker is not None:
                model = _eval_model(engine, ema, task).eval()
                scores, images = task.evaluate(model, held, device)
                engine.module.train()
                tracker.log(scores, step)
                tracker.log_images(images, step)
                tracker.flush()
            state = {**state, "step": step, "samples_per_rank": step * per_step}
            checkpoint.save(engine, ema, state, {"step": step}, rank)

    if rank == 0:
        model = _eval_model(engine, ema, task)
        task.export(model, spec["out_url"])
        tracker.finish()


def _eval_model(engine, ema, task: TrainTask) -> nn.Module:
    """The weights to evaluate and export: the EMA's when kept, else the engine's."""
    if ema is None:
        return engine.module
    with torch.random.fork_rng(devices=[]):  # building must not move the global RNG
        model = task.build_model().to(next(engine.module.parameters()).device)
    model.load_state_dict({k: v.to(dtype=model.state_dict()[k].dtype) for k, v in ema.state_dict().items()})
    return model.eval()
