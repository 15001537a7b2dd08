"""The driver side of training: one Ray Train `TorchTrainer` run per trained model.

The run lives under `<stage>/_train/run` (Ray Train's storage: checkpoints and its own state),
so rerunning the stage after a crash restores the latest complete checkpoint by itself, and
Ray's `FailureConfig` restarts lost workers from it within one run.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import ray

from pipeline import storage
from pipeline.config.models import TrainConfig
from pipeline.errors import CheckpointMismatch, StageFailed, one_line
from pipeline.observe.progress import StageProgress
from pipeline.train.checkpoint import resumable
from pipeline.train.loop import TrainSpec, train_worker
from pipeline.train.paths import progress_url, run_storage, train_storage

log = logging.getLogger(__name__)


def wants_gpu(cfg: TrainConfig) -> bool:
    """The recipe's `use_gpu`, or whether the cluster has GPUs when it is null."""
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def _worker_errors(err: Exception) -> str:
    """The first failed rank's error in one line (Ray Train's errors carry each rank's)."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        return f"rank {rank}: {one_line(failure)}"
    return one_line(err)


def fit(
    label: str,
    task: str,
    config: dict[str, Any],
    cfg: TrainConfig,
    *,
    data_url: str,
    holdout: int,
    out_url: str,
    stage_url: str,
    name: str,
    progress: StageProgress | None = None,
) -> None:
    """Trains `task` (a "module:Class" TrainTask) to `cfg.steps`, resuming from the latest
    checkpoint; rank 0 exports the final weights to `out_url`. Raises StageFailed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    try:  # refuse a resume with another world size here, not deep inside DeepSpeed
        resumable(run_storage(stage_url), cfg.workers)
    except CheckpointMismatch as err:
        raise StageFailed(f"stage '{label}': {err}") from None
    use_gpu = wants_gpu(cfg)
    spec = TrainSpec(
        task=task,
        config=config,
        train=cfg,
        data_url=data_url,
        holdout=holdout,
        out_url=out_url,
        run_url=stage_url,
        name=name,
        use_gpu=use_gpu,
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="run",
            storage_path=train_storage(stage_url),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": {} if use_gpu else {"DS_ACCELERATOR": "cpu"}},
        ),
    )
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"{label}-fit", daemon=True)
    thread.start()
    if progress is not None:
        progress.start(label, total=cfg.steps, unit="steps")
    while thread.is_alive():
        thread.join(timeout=1.0)
        state = storage.read_json_or_none(progress_url(stage_url))
        if progress is not None and state is not None:
            progress.update(label, state["step"], state.get("samples_per_s"))
    if "error" in outcome:
        raise StageFailed(f"stage '{label}': training failed: {_worker_errors(outcome['error'])}") from None
    if progress is not None:
        progress.finish(label)
