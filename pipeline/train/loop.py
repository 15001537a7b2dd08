"""The training loop every Ray Train worker runs, for any model given as a `TrainTask`.

A task says how to build the model, decode and collate samples, compute the loss of a batch at a
step, evaluate on held-out samples and export the final weights; this loop does the rest: the
model built partitioned (ZeRO-3), the DeepSpeed engine, the learning-rate schedule, the resumable
data stream, per-step noise seeded from (seed, step, rank) so a resumed run draws the same noise,
the sharded EMA, evaluation on every rank (`pipeline.train.evaluation`), metrics, checkpoints and
the streamed export.
"""

from __future__ import annotations

import importlib
import itertools
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
from pipeline.data.loader import BatchLayout, ShardSpan
from pipeline.data.shards import Sample

log = logging.getLogger(__name__)


class TrainTask(Protocol):
    """What a trained model contributes to the loop (constructed with its stage config dict).
    Optional: `tokens_per_sample` and `flops_per_token` attributes (for tokens/s and MFU);
    `heldout_losses(model, held, device) -> {metric: per-sample values}` for metrics that are
    means over samples (then each rank evaluates its share of the held-out set and `evaluate` is
    not used); `export_tensors(tensors, out_url) -> files` to write the final weights from a
    stream of (name, full tensor), one at a time, instead of `export` from a whole model."""

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
        """Metrics and uint8 image grids on the whole held-out set, run on every rank with the
        engine's module (meaningful on rank 0)."""

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        """Writes the final weights under `out_url`; returns the file names."""


MOVED_TASKS = {
    "pipeline.stages.dvae:DVAETask": "pipeline.stages.dvae_task:DVAETask",
    "pipeline.stages.clip:ClipTask": "pipeline.stages.clip_task:ClipTask",
    "pipeline.stages.train:TransformerTask": "pipeline.stages.train_task:TransformerTask",
}
"""Where the tasks a checkpoint's `task.json` names moved (the stage modules lost torch), so that
checkpoints written before still export and resume."""


def load_task(path: str, config: dict[str, Any]) -> TrainTask:
    """The task "module:Class" at `path` (as a checkpoint's `task.json` names it) built from `config`."""
    module, cls = MOVED_TASKS.get(path, path).split(":")
    return getattr(importlib.import_module(module), cls)(config)


def step_seed(seed: int, step: int, lane: int, index: int) -> int:
    """The noise seed of one micro-batch slot of an update (the same whichever rank computes it)."""
    return (seed * 1_000_003 + step * 10_007 + lane * 101 + index) % (2**63)


def _forget_keys_after(run_url: str, step: int) -> None:
    """Removes sample-key files of steps after the one resumed from (left by ranks of an abandoned
    attempt, possibly of another world size), so the audit sees each trained step once."""
    from pipeline.train.paths import sample_keys_root

    root = sample_keys_root(run_url)
    fs, _ = storage.get_fs(root)
    for rel in storage.file_sizes(root):
        if int(rel.rsplit("/", 1)[-1].split(".")[0]) > step:
            fs.rm(storage.get_fs(storage.join(root, rel))[1])


class KeyedDecode:
    """Decodes a sample and keeps its key beside it (picklable for DataLoader workers)."""

    def __init__(self, task: TrainTask):
        self.task = task

    def __call__(self, sample: Sample) -> tuple[str, Any]:
        return sample["__key__"], self.task.decode(sample)


def micro_step(
    task: TrainTask,
    engine,
    items: list[Any],
    step: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    """One micro-batch through the engine: forward, backward and the engine's step (which updates
    at the end of an accumulation). The metrics stay on the device (tensors or floats); nothing
    here waits for the GPU, so the host runs ahead until the window's metrics are read."""
    batch = task.collate(items, device, dtype)
    loss, metrics = task.loss(engine, batch, step, generator)
    engine.backward(loss)
    engine.step()
    return {"loss": loss.detach(), **metrics}


def window_means(window: list[dict[str, Any]]) -> dict[str, float]:
    """Each metric's mean over a logging window of `micro_step` results, read from the device once."""
    means = {}
    for key in window[0]:
        values = [w[key] for w in window]
        if isinstance(values[0], torch.Tensor):
            means[key] = float(torch.stack([v.float() for v in values]).mean())
        else:
            means[key] = float(np.mean(values))
    return means


@dataclass(frozen=True)
class TrainSpec:
    """What every training worker is given (built by `pipeline.train.trainer.fit`)."""

    task: str
    """The `TrainTask` as "module:Class"."""
    config: dict[str, Any]
    """The task's config, as JSON (the checkpoint keeps it beside the task to rebuild the model)."""
    train: TrainConfig
    train_spans: list[ShardSpan]
    """The committed shards trained on (the driver reads the ledger once for every rank)."""
    held_spans: list[ShardSpan]
    """The held-out samples (the last in shard order), kept out of training for evaluation."""
    out_url: str
    """Where the final weights are exported."""
    run_url: str
    """The trained stage's folder (its `_train/` run, metrics and W&B files)."""
    name: str
    """The W&B run's name."""
    use_gpu: bool

    def tracked(self) -> dict[str, Any]:
        """The spec as the W&B run's config (shard counts, not the shard lists)."""
        spec = {k: v for k, v in asdict(self).items() if k not in ("train_spans", "held_spans")}
        spec.update(train=self.train.model_dump(mode="json"), train_shards=len(self.train_spans))
        spec.update(train_samples=sum(s.count for s in self.train_spans))
        return {**spec, "heldout_samples": sum(s.count for s in self.held_spans)}


def train_worker(spec: TrainSpec) -> None:
    """Ray Train's `train_loop_per_worker`."""
    on_gpu = spec.use_gpu
    if on_gpu and not torch.cuda.is_available():  # never a silent fall back to fp32 on CPUs
        raise RuntimeError("the recipe asks for GPUs (train.use_gpu) but torch sees no CUDA device in this worker")
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train.torch

    from pipeline.train.session import RaySession

    device = ray.train.torch.get_device() if on_gpu else torch.device("cpu")
    run(spec, RaySession(), device)


def run(spec: TrainSpec, session, device: torch.device):
    """Trains `spec` on this rank of `session` (a `pipeline.train.session.Session`), on `device`,
    from the run's newest complete checkpoint to `spec.train.steps`, then exports the weights;
    returns the DeepSpeed engine. `torch.distributed` is initialised (NCCL on GPUs)."""
    from pipeline.observe.tracking import Tracker, new_run_id
    from pipeline.train import checkpoint, throughput
    from pipeline.train.collectives import mean_across_ranks
    from pipeline.train.ema import EMA
    from pipeline.train.engine import autocast_dtype, build_engine, build_model, loss_scale, set_lr
    from pipeline.train.evaluation import evaluate_with_ema, held_out
    from pipeline.train.paths import progress_url, run_storage, sample_keys_url
    from pipeline.train.schedules import learning_rate

    on_gpu = device.type == "cuda"
    rank, world = session.rank, session.world
    cfg = spec.train
    dtype = autocast_dtype(cfg, on_gpu)
    task = load_task(spec.task, spec.config)

    url = checkpoint.newest(run_storage(spec.run_url))  # rank 0 looks, every rank is told
    state = checkpoint.trainer_state(url) if url else None
    if state is None:
        state = {"step": 0, "run_id": new_run_id(), "lanes": world, "per_lane": cfg.grad_accum}
    layout = BatchLayout(state["lanes"], state["per_lane"])
    run_cfg = cfg.model_copy(update={"grad_accum": layout.slots // world})  # this world's share of an update
    torch.manual_seed(cfg.seed)
    engine = build_engine(build_model(task.build_model, run_cfg, world, on_gpu), run_cfg, world, on_gpu)
    ema = EMA(engine.module, cfg.ema_decay, rank, world) if cfg.ema_decay is not None else None
    if url:
        checkpoint.load(engine, ema, url, state, rank, world)
    step = state["step"]

    tracker = None
    if rank == 0:
        tracker = Tracker(
            spec.run_url, run_id=state["run_id"], name=spec.name, project=cfg.wandb_project, config=spec.tracked()
        )
        tracker.truncate(step)
        if step:
            tracker.log({"resumed_from": step}, step)
    held, real = held_out(task, spec.held_spans, rank, world)
    per_update = cfg.batch_size * layout.slots
    updates = layout.rank_batches(
        spec.train_spans,
        rank,
        world,
        seed=cfg.seed,
        decode=KeyedDecode(task),
        batch_size=cfg.batch_size,
        step=step,
        workers=cfg.loader_workers,
    )
    if step:
        log.info("rank %d of %d resumes at step %d (sample %d of the run)", rank, world, step, step * per_update)
    peak = throughput.peak_flops(device, cfg.precision if on_gpu else "fp32")
    keys_url = sample_keys_url(spec.run_url, rank)
    if rank == 0 and cfg.log_sample_keys:
        _forget_keys_after(spec.run_url, step)

    window: list[dict[str, float]] = []
    keys: list[list[str]] = []
    started, window_start = time.monotonic(), step
    while step < cfg.steps:
        lr = learning_rate(step, cfg)
        set_lr(engine, lr)
        step_keys: list[str] = []
        for (lane, index), keyed in next(updates):
            step_keys += [key for key, _ in keyed]
            generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, lane, index))
            window.append(micro_step(task, engine, [item for _, item in keyed], step, generator, device, dtype))
        keys.append(step_keys)
        step += 1
        if ema is not None:
            ema.update(engine.module)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            metrics = window_means(window)
            metrics = mean_across_ranks(metrics)
            seconds = time.monotonic() - started
            samples_per_s = (step - window_start) * per_update / max(seconds, 1e-9)
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
            scores, images = evaluate_with_ema(task, engine, ema, held, real, device)
            if tracker is not None:
                tracker.log(scores, step)
                tracker.log_images(images, step)
                tracker.flush()
            if cfg.log_sample_keys:  # written before the checkpoint: a rerun rewrites the same file
                storage.write_json(storage.join(keys_url, f"{step:08d}.json"), {"last_step": step, "keys": keys})
            keys = []
            state = {**state, "step": step, "world": world, "samples": step * per_update}
            task_spec = {"task": spec.task, "config": spec.config}
            checkpoint.save(engine, ema, state, task_spec, {"step": step}, rank, session)

    _export(task, engine, ema, spec.out_url, rank)
    if tracker is not None:
        tracker.finish()
    return engine


def _export(task: TrainTask, engine, ema, out_url: str, rank: int) -> None:
    """Writes the final weights (the EMA's when kept) under `out_url` from rank 0. With
    `export_tensors` they stream one gathered parameter at a time (collective); otherwise (small
    models) rank 0 builds the whole model."""
    from pipeline.train.weights import module_tensors

    if hasattr(task, "export_tensors"):
        if ema is None:
            tensors = module_tensors(engine.module)
        else:
            tensors = itertools.chain(ema.full_tensors(), engine.module.named_buffers())
        if rank == 0:
            task.export_tensors(tensors, out_url)
        for _ in tensors:  # the other ranks take part in every gather
            pass
        return
    model = _whole_model(engine, ema, task)
    if rank == 0:
        task.export(model, out_url)


def _whole_model(engine, ema, task: TrainTask) -> nn.Module | None:
    """The final weights as a plain float32 module on rank 0 (None elsewhere): the EMA's when
    kept, else the engine's, gathered from the partitions. Collective; for models that fit one
    rank whole (the dVAE, CLIP)."""
    from pipeline.train.weights import live_state, load_weights

    state = live_state(engine, ema)
    if state is None:
        return None
    with torch.random.fork_rng(devices=[]):  # building must not move the global RNG
        model = task.build_model()
    return load_weights(model, state).eval()
