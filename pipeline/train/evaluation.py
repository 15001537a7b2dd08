"""Held-out evaluation during training, on every rank together and in the training precision.

A task whose metrics are means over samples (`TrainTask.heldout_losses`, the transformer) is
evaluated on its own share of the held-out set on each rank: rank r takes samples [r·k, (r+1)·k)
(k = ceil(H / world)), the last ranks pad their share with copies of the first sample so that every
rank runs the same number of forwards (a ZeRO-3 forward is a collective), and the padding is left
out of the sums. The sums and counts are then all-reduced: the means equal those of one rank
evaluating the whole set, at 1/world of the cost. Other tasks (the dVAE and CLIP, whose metrics
need the whole set and whose models are whole on every rank) evaluate everything on every rank.
With an EMA, the same runs again with the EMA's weights swapped into the engine's partitions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data.loader import ShardSpan, read_span
from pipeline.train.collectives import all_reduce_sum


def share(held: list[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """Rank `rank`'s share of the held-out items, padded to the common length, and how many of them
    are real (the rest are padding)."""
    if not held:
        return [], 0
    size = math.ceil(len(held) / world)
    part = held[rank * size : (rank + 1) * size]
    return part + [held[0]] * (size - len(part)), len(part)


def sharded_means(per_sample: dict[str, np.ndarray], real: int) -> dict[str, float]:
    """Means over every rank's real samples of per-sample metrics (collective)."""
    keys = sorted(per_sample)
    sums = [float(np.asarray(per_sample[k][:real], dtype=np.float64).sum()) for k in keys]
    totals = all_reduce_sum(torch.tensor([*sums, float(real)], dtype=torch.float64)).tolist()
    count = totals[-1]
    return {k: v / count for k, v in zip(keys, totals[:-1])} if count else {}


def held_out(task, spans: list[ShardSpan], rank: int, world: int) -> tuple[list[Any], int | None]:
    """The decoded held-out items this rank evaluates and how many are real: its share for a task
    with `heldout_losses`, else the whole set (real None)."""
    raw = [sample for span in spans for sample in read_span(span)]
    if hasattr(task, "heldout_losses"):
        part, real = share(raw, rank, world)
        return [task.decode(s) for s in part], real
    return [task.decode(s) for s in raw], None


def evaluate(task, model: nn.Module, held: list[Any], real: int | None, device: torch.device):
    """(metrics, images) of `model` on this rank's held-out items (from `held_out`)."""
    model.eval()
    try:
        if real is None:
            return task.evaluate(model, held, device)
        return (sharded_means(task.heldout_losses(model, held, device), real) if held else {}), {}
    finally:
        model.train()


def evaluate_with_ema(task, engine, ema, held: list[Any], real: int | None, device: torch.device):
    """The engine's metrics, then (with an EMA) the EMA's prefixed `ema_`, whose images are the ones
    shown. Collective."""
    scores, images = evaluate(task, engine.module, held, real, device)
    if ema is not None:
        with ema.applied(engine):
            ema_scores, ema_images = evaluate(task, engine.module, held, real, device)
        scores = {**scores, **{f"ema_{k}": v for k, v in ema_scores.items()}}
        images = ema_images or images
    return scores, images
