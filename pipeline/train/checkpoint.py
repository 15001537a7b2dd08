"""Training checkpoints through Ray Train: every rank saves its DeepSpeed files and its EMA shard
into one checkpoint folder (`checkpoint_<step>`), with a list of the files it wrote; rank 0 adds
the trainer state (step, data position, W&B run id, world size) and the task (to rebuild the
model for `dalle export`).

    checkpoint_00000040/
      deepspeed/            DeepSpeed's files (model and optimizer partitions of every rank)
      ema/rank_00001.pt     rank 1's EMA shard (when the run keeps an EMA)
      ranks/rank_00001.json the files rank 1 wrote, with their sizes
      trainer_state.json    {"step", "world", "run_id", "samples_per_rank"}
      task.json             {"task": "module:Class", "config": {...}}

Ray Train registers a checkpoint once every rank has reported it and keeps the last K. After a
restart (`FailureConfig`, or a rerun of the stage) the workers resume from the newest complete
checkpoint in the run folder (every rank's listed files present at their size); an incomplete
one is skipped, with a warning, for the newest complete one before it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

from pipeline import storage
from pipeline.errors import CheckpointMismatch
from pipeline.train.weights import DEEPSPEED_TAG

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
TASK = "task.json"
PREFIX = "checkpoint_"


def _files_under(folder: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


def save(engine, ema, state: dict[str, Any], task: dict[str, Any], metrics: dict[str, float], rank: int) -> None:
    """Saves on every rank (collective), then reports the checkpoint to Ray Train."""
    import ray.train

    folder = tempfile.mkdtemp(prefix="ckpt-")
    try:
        engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        if ema is not None:
            os.makedirs(os.path.join(folder, "ema"))
            torch.save(ema.state_dict(), os.path.join(folder, "ema", f"rank_{rank:05d}.pt"))
        if rank == 0:
            for name, obj in ((STATE, state), (TASK, task)):
                with open(os.path.join(folder, name), "w") as f:
                    json.dump(obj, f)
        files = _files_under(folder)
        os.makedirs(os.path.join(folder, "ranks"))
        with open(os.path.join(folder, "ranks", f"rank_{rank:05d}.json"), "w") as f:
            json.dump(files, f)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"{PREFIX}{state['step']:08d}",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def problem(url: str) -> str | None:
    """Why the checkpoint folder at `url` (local path or fsspec URL) cannot be resumed, or None."""
    state = storage.read_json_or_none(storage.join(url, STATE))
    if state is None:
        return f"no {STATE}"
    fs, _ = storage.get_fs(url)
    for rank in range(state["world"]):
        files = storage.read_json_or_none(storage.join(url, "ranks", f"rank_{rank:05d}.json"))
        if files is None:
            return f"rank {rank} left no file list"
        for rel, size in sorted(files.items()):
            path = storage.get_fs(storage.join(url, rel))[1]
            if not fs.exists(path):
                return f"rank {rank}'s {rel} is missing"
            if fs.size(path) != size:
                return f"rank {rank}'s {rel} has {fs.size(path)} bytes, it wrote {size}"
    return None


def checkpoints(run_url: str) -> list[str]:
    """Checkpoint folder names under a Ray Train run folder, newest first."""
    fs, path = storage.get_fs(run_url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = [os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
    return sorted((n for n in names if n.startswith(PREFIX) and n[len(PREFIX) :].isdigit()), reverse=True)


def latest_complete(run_url: str) -> str | None:
    """The URL of the newest complete checkpoint of a run, warning about each incomplete one
    passed over."""
    for name in checkpoints(run_url):
        url = storage.join(run_url, name)
        reason = problem(url)
        if reason is None:
            return url
        log.warning("skipping incomplete checkpoint %s: %s", url, reason)
    return None


def resumable(run_url: str, world: int) -> dict[str, Any] | None:
    """The trainer state of the checkpoint a run would resume from; raises CheckpointMismatch
    when it was written by another number of workers (checked on the driver before training)."""
    url = latest_complete(run_url)
    if url is None:
        return None
    state = storage.read_json(storage.join(url, STATE))
    if state["world"] != world:
        raise CheckpointMismatch(
            f"{url} was written by {state['world']} workers, this run has {world}: set "
            f"train.workers={state['world']} to resume it, or --force the stage to start over"
        )
    return state


def load(engine, ema, world: int, run_url: str) -> dict[str, Any] | None:
    """Restores the newest complete checkpoint of the run at `run_url`; returns its trainer
    state, or None to start from scratch.

    The run folder is scanned rather than trusting only `ray.train.get_checkpoint()`: Ray Train
    registers a checkpoint when its controller next polls the workers, so a crash shortly after
    a report can leave a complete checkpoint on storage that Ray never registered, and resuming
    from Ray's older one would redo (and re-log) those steps."""
    import ray.train

    url = latest_complete(run_url)
    if url is None:
        return None
    registered = ray.train.get_checkpoint()
    if registered is None or os.path.basename(registered.path.rstrip("/")) != os.path.basename(url):
        log.info("resuming from %s (Ray Train handed back %s)", url, registered.path if registered else "none")
    with storage.local_copy(url) as folder:  # DeepSpeed reads local files only
        with open(os.path.join(folder, STATE)) as f:
            state = json.load(f)
        if state["world"] != world:
            raise CheckpointMismatch(
                f"{url} was written by {state['world']} workers, this run has {world}; "
                f"set train.workers={state['world']} to resume it (or --force the stage)"
            )
        load_path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=True)
        if load_path is None:
            raise CheckpointMismatch(f"{url}: DeepSpeed found no '{DEEPSPEED_TAG}' checkpoint in it")
        if ema is not None:
            path = os.path.join(folder, "ema", f"rank_{ema.rank:05d}.pt")
            ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return state
