"""Shard tasks on a pool of Ray actors that each load models once (encode, sample, evaluate).

Ray Data streams the pending shards through `ShardActor`s (an `ActorPoolStrategy` pool, one GPU
each when the cluster has them, restarted when they die); each actor builds its models with the
`load` function once, then runs the shard function on every shard it is given. The shard function
writes and commits its shard through the ledger, so resume and per-shard failure records work as
in `pipeline.executor.run_tasks`.
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from typing import Any

import ray

from pipeline.executor import StageFailed, first_line
from pipeline.ledger import Ledger
from pipeline.progress import StageProgress

log = logging.getLogger(__name__)


def _resolve(name: str) -> Any:
    """ "module:attr.attr" -> the object."""
    module, _, path = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class ShardActor:
    """A pool actor: `spec` holds "load" and "fn" ("module:attr"), "models" (what `load` gets),
    "stage_url" (for failure records) and "common" (merged into every shard's payload)."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.state = _resolve(spec["load"])(spec["models"])
        self.fn = _resolve(spec["fn"])

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {"shard": [], "samples_out": [], "error": []}
        for shard, payload in zip(batch["shard"], batch["payload"]):
            shard = str(shard)
            try:
                record = self.fn(self.state, {**self.spec["common"], **json.loads(str(payload)), "shard": shard})
                out["samples_out"].append(record.samples_out)
                out["error"].append("")
            except Exception as err:  # noqa: BLE001 - recorded per shard; the stage reports them
                message = f"{type(err).__name__}: {err}".splitlines()[0]
                Ledger(self.spec["stage_url"]).record_failure(shard, message)
                out["samples_out"].append(0)
                out["error"].append(message)
            out["shard"].append(shard)
        return out


def pool_shape(actors: int | None, gpus_per_actor: float | None, cpus: float) -> tuple[int, float, float]:
    """(actors, GPUs per actor, CPUs per actor) on this cluster: one actor per GPU when it has GPUs,
    else one per `cpus` CPUs, unless the recipe says otherwise."""
    gpus = ray.cluster_resources().get("GPU", 0)
    per_gpu = gpus_per_actor if gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if actors is not None:
        return actors, per_gpu, cpus
    if per_gpu > 0:
        return max(1, int(gpus / per_gpu)), per_gpu, cpus
    return max(1, int(ray.cluster_resources().get("CPU", 1) / cpus)), 0.0, cpus


def run_on_pool(
    ledger: Ledger,
    todo: list[tuple[str, dict[str, Any]]],
    spec: dict[str, Any],
    *,
    label: str,
    progress: StageProgress,
    shape: tuple[int, float, float],
    max_retries: int = 2,
) -> None:
    """Runs (shard, payload) tasks on a pool of `shape` = (actors, GPUs, CPUs each); raises
    StageFailed naming the first failure when any shard failed (its record says why)."""
    import ray.data

    if todo:
        actors, gpus, cpus = shape
        actors = min(actors, len(todo))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        log.info("%s: %d shards on %d actors (%.1f GPU, %.1f CPU each)", label, len(todo), actors, gpus, cpus)
        items = [{"shard": shard, "payload": json.dumps(payload)} for shard, payload in todo]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardActor,
            fn_constructor_kwargs={"spec": {**spec, "stage_url": ledger.root}},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=cpus,
            max_restarts=max_retries,
            max_task_retries=max_retries,
        )
        started, samples = time.monotonic(), 0
        try:
            for row in dataset.iter_rows():
                if row["error"]:
                    log.warning("%s: shard %s failed: %s", label, row["shard"], row["error"])
                    progress.failed(label)
                samples += int(row["samples_out"])
                record = None if row["error"] else ledger.record(row["shard"])
                progress.advance(label, samples / max(time.monotonic() - started, 1e-6), record)
        except Exception as err:  # noqa: BLE001 - e.g. actors that cannot load their models
            raise StageFailed(f"stage '{label}': {first_line(err)}") from None
    failures = ledger.failures()
    if failures:
        shard, info = sorted(failures.items())[0]
        raise StageFailed(
            f"stage '{label}': {len(failures)} shards failed (first: shard {shard}: {info['error']}); "
            "rerun to retry them"
        )
