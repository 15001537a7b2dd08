"""The driver side of training: one Ray Train `TorchTrainer` run per trained model.

The run lives under `<stage>/_train/run` (Ray Train's storage: checkpoints and its own state),
so rerunning the stage after a crash restores the latest complete checkpoint by itself, and
Ray's `FailureConfig` restarts lost workers from it within one run (not a run that met a damaged
shard: `pipeline.train.failures`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pipeline import storage
from pipeline.config.models import TrainConfig
from pipeline.data.loader import BatchLayout, split_holdout
from pipeline.engine.ledger import Ledger
from pipeline.engine.resources import own_ray
from pipeline.errors import StageFailed, one_line
from pipeline.observe.progress import StageProgress
from pipeline.train.checkpoint import resumable
from pipeline.train.loop import TrainSpec, train_worker
from pipeline.train.paths import progress_url, run_storage, train_storage
from pipeline.train.reshard import convert, converted, needs_conversion

log = logging.getLogger(__name__)


def wants_gpu(cfg: TrainConfig) -> bool:
    """The recipe's `use_gpu` (null: no), whatever the cluster has now: an autoscaling cluster has
    no GPU node when a run starts, and only Ray Train's ask for them makes it start some. (The
    stage has made sure they can be had: `pipeline.engine.resources.await_gpus`.)"""
    return bool(cfg.use_gpu)


def _worker_errors(err: Exception) -> str:
    """The first failed rank's error in one line (Ray Train's errors carry each rank's)."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        return f"rank {rank}: {one_line(failure)}"
    return one_line(err)


def prepare_resume(label: str, run_url: str, cfg: TrainConfig, run_tasks=None) -> None:
    """When the newest checkpoint was written by another number of workers: refuses (one line) a
    worker count that cannot share the run's updates, and converts ZeRO 1-3 states for the new world
    (`pipeline.train.reshard.convert`: one task per old rank, once per checkpoint). `run_tasks(fn,
    args_list)` runs the tasks: Ray tasks on the cluster by default."""
    found = resumable(run_url)
    if found is None or found[1]["world"] == cfg.workers:
        return
    url, state = found
    problem = BatchLayout(state["lanes"], state["per_lane"]).problem(cfg.workers)
    if problem:
        raise StageFailed(f"stage '{label}': cannot resume {url} on {cfg.workers} workers: {problem}")
    log.info("%s: resuming a run of %d workers on %d", label, state["world"], cfg.workers)
    if needs_conversion(cfg.zero_stage) and not converted(url):
        try:
            convert(url, state["world"], run_tasks or _ray_tasks)
        except Exception as err:  # noqa: BLE001 - a failed conversion ends the stage in one line
            raise StageFailed(
                f"stage '{label}': converting {url} for {cfg.workers} workers failed: {one_line(err)}"
            ) from None


def _ray_tasks(fn, args_list: list[tuple]) -> list:
    """`fn(*args)` for each args as Ray tasks of one CPU, spread over the cluster; their results."""
    import ray

    task = ray.remote(num_cpus=1)(fn).options(runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    return ray.get([task.remote(*args) for args in args_list])


def _torch_trainer(local: bool):
    """Ray Train's `TorchTrainer` with our failure policy (`pipeline.train.failures`: a damaged
    shard ends the run instead of restarting into it) and, for a Ray this process started (`dalle
    run` without an address: `local`), without its placement-group cleaner. The cleaner is a
    detached actor that removes a run's placement group should its controller die while the job
    lives on; it asks Ray's state API whether the controller lives, which a Ray started with
    `address="local"` does not serve to its actors, so each ask hangs, and every run's end waited
    12 s for the cleaner to give up. Such a Ray (its placement groups with it) ends with this
    process. On a cluster the cleaner stays."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipeline.train.failures import DamagedShardsEndRun

    class PipelineTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if not (local and isinstance(c, PlacementGroupCleanerCallback))]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            controller_init_kwargs["failure_policy"] = DamagedShardsEndRun(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    return PipelineTorchTrainer


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
) -> int:
    """Trains `task` (a "module:Class" TrainTask) to `cfg.steps`, resuming from the latest
    checkpoint; rank 0 exports the final weights to `out_url`. Returns the samples the run
    trained on (its last checkpoint's count: the layout it started with, whatever the workers
    now). Raises StageFailed."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    prepare_resume(label, run_storage(stage_url), cfg)
    use_gpu = wants_gpu(cfg)
    train_spans, held_spans = split_holdout(Ledger(data_url).spans(), holdout)
    spec = TrainSpec(
        task=task,
        config=config,
        train=cfg,
        train_spans=train_spans,
        held_spans=held_spans,
        out_url=out_url,
        run_url=stage_url,
        name=name,
        use_gpu=use_gpu,
    )
    trainer = _torch_trainer(local=own_ray())(
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
    found = resumable(run_storage(stage_url))
    return found[1].get("samples", cfg.samples_seen) if found else cfg.samples_seen
