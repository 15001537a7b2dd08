"""`dalle export CKPT OUT`: consolidated weights from a training checkpoint, loadable without
DeepSpeed (for the transformer: `pipeline.models.transformer.load_dalle(OUT)`).

CKPT is a checkpoint folder (`<stage>/_train/run/checkpoint_00000040`), a run folder, or the
stage folder itself (its newest complete checkpoint is used). The weights are the EMA's when the
run kept one (`--weights ema`, the default) or the engine's (`--weights model`), gathered from
the ZeRO partitions; the task named in the checkpoint writes them (the transformer: streamed into
sharded safetensors, one parameter in memory at a time).
"""

from __future__ import annotations

import os
from typing import Any

from pipeline import storage
from pipeline.errors import InputError, WeightsError
from pipeline.train import checkpoint
from pipeline.train.loop import load_task
from pipeline.train.weights import Weights, checkpoint_tensors, load_weights


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
    """Writes the consolidated model of checkpoint `path` under `out`; returns a summary. Only the
    files the weights come from are fetched; the weights stream through one parameter at a time
    for a task that writes them so (the transformer), else they build the whole model."""
    url = resolve(path)
    spec = storage.read_json(storage.join(url, checkpoint.TASK))
    state = storage.read_json(storage.join(url, checkpoint.STATE))
    task = load_task(spec["task"], spec["config"])
    out_url = storage.absolute(out)
    storage.makedirs(out_url)
    params = 0

    def counted(tensors):
        nonlocal params
        for name, value in tensors:
            params += value.numel()
            yield name, value

    try:
        with checkpoint_tensors(url, weights) as (tensors, used):
            if hasattr(task, "export_tensors"):
                files = task.export_tensors(counted(tensors), out_url)
            else:
                model = load_weights(task.build_model(), dict(counted(tensors)))
                files = task.export(model, out_url)
    except WeightsError as err:
        raise InputError(str(err)) from None
    return {"checkpoint": url, "step": state["step"], "weights": used, "out": out_url, "files": files, "params": params}


def describe(summary: dict[str, Any]) -> str:
    names = ", ".join(summary["files"])
    return (
        f"exported step {summary['step']} ({summary['weights']} weights, {summary['params']:,} parameters) "
        f"from {summary['checkpoint']} to {summary['out']}{os.sep}: {names}"
    )
