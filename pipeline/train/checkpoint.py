"""Training checkpoints through Ray Train: every rank saves its DeepSpeed files into one
checkpoint folder (`checkpoint_<step>`), rank 0 adds the trainer state (step, data position,
W&B run id, world size) and the EMA weights.

Ray Train registers a checkpoint only once every rank has reported it, keeps the last K, and
hands the latest back to the workers after a restart (`ray.train.get_checkpoint()`), whether the
restart is Ray's own (`FailureConfig`) or a rerun of the same stage.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import ray.train
import torch

TAG = "deepspeed"
STATE = "trainer_state.json"
EMA_FILE = "ema.pt"


class CheckpointMismatch(RuntimeError):
    """A checkpoint that cannot be resumed by this run (one line for the user)."""


def save(engine, ema, state: dict[str, Any], metrics: dict[str, float], rank: int) -> None:
    """Saves on every rank (collective), then reports the checkpoint to Ray Train."""
    folder = tempfile.mkdtemp(prefix="ckpt-")
    try:
        engine.save_checkpoint(folder, tag=TAG)
        if rank == 0:
            with open(os.path.join(folder, STATE), "w") as f:
                json.dump(state, f)
            if ema is not None:
                torch.save(ema.state_dict(), os.path.join(folder, EMA_FILE))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=f"checkpoint_{state['step']:08d}",
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load(engine, ema, world: int) -> dict[str, Any] | None:
    """Restores the latest reported checkpoint, if any; returns its trainer state."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, STATE)
        if not os.path.exists(path):
            raise CheckpointMismatch(f"{checkpoint.path}: no {STATE}; not a checkpoint of this trainer")
        with open(path) as f:
            state = json.load(f)
        if state["world"] != world:
            raise CheckpointMismatch(
                f"{checkpoint.path} was written by {state['world']} workers, this run has {world}; "
                f"set train.workers={state['world']} to resume it (or --force the stage)"
            )
        load_path, _ = engine.load_checkpoint(folder, tag=TAG, load_module_strict=True)
        if load_path is None:
            raise CheckpointMismatch(f"{checkpoint.path}: DeepSpeed found no '{TAG}' checkpoint in it")
        if ema is not None:
            ema.load_state_dict(torch.load(os.path.join(folder, EMA_FILE), map_location="cpu", weights_only=True))
    return state
