"""`dalle export CKPT OUT`: consolidated weights from a training checkpoint, loadable without
DeepSpeed (for the transformer: `pipeline.models.transformer.load_dalle(OUT)`).

CKPT is a checkpoint folder (`<stage>/_train/run/checkpoint_00000040`), a run folder, or the
stage folder itself (its newest complete checkpoint is used). The weights are the EMA's when the
run kept one (`--weights ema`, the default) or the engine's (`--weights model`), gathered from
the ZeRO partitions; the task named in the checkpoint rebuilds the model and writes it.
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import storage
from pipeline.errors import InputError, WeightsError
from pipeline.train import checkpoint
from pipeline.train.loop import load_task
from pipeline.train.weights import Weights, checkpoint_state, load_weights


def resolve(path: str) -> str:
    """The checkpoint folder `path` names (see the module docstring); raises InputError."""
    url = storage.absolute(path)
    if storage.exists(storage.join(url, checkpoint.STATE)):
        reason = checkpoint.problem(url)
        if reason is not None:
            raise InputError(f"{path}: incomplete checkpoint: {reason}")
        return url
    for run in (url, storage.join(url, "run"), storage.join(url, "_train", "run")):
        found = checkpoint.latest_complete(run)
        if found is not None:
            return found
    raise InputError(f"{path}: no complete training checkpoint here (give a checkpoint_* folder or a train stage)")


def export(path: str, out: str, weights: Weights = "ema") -> dict[str, Any]:
    """Writes the consolidated model of checkpoint `path` under `out`; returns a summary."""
    url = resolve(path)
    spec = storage.read_json(storage.join(url, checkpoint.TASK))
    state = storage.read_json(storage.join(url, checkpoint.STATE))
    try:
        with storage.local_copy(url) as folder:
            weights_state, used = checkpoint_state(folder, weights)
    except WeightsError as err:
        raise InputError(str(err)) from None
    task = load_task(spec["task"], spec["config"])
    model = load_weights(task.build_model(), weights_state)
    out_url = storage.absolute(out)
    storage.makedirs(out_url)
    files = task.export(model, out_url)
    params = sum(p.numel() for p in model.parameters())
    return {"checkpoint": url, "step": state["step"], "weights": used, "out": out_url, "files": files, "params": params}


def describe(summary: dict[str, Any]) -> str:
    names = ", ".join(summary["files"])
    return (
        f"exported step {summary['step']} ({summary['weights']} weights, {summary['params']:,} parameters) "
        f"from {summary['checkpoint']} to {summary['out']}{os.sep}: {names}"
    )
