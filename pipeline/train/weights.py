"""Whole model weights out of a partitioned run: from the live engine (a collective, at
evaluation and at the end of training) or from a checkpoint folder (offline, `dalle export`).

The EMA weights are preferred when the run keeps an EMA (they are what the paper samples from);
otherwise the engine's: under ZeRO-3 gathered from every rank's partition, and from a checkpoint
through DeepSpeed's own ZeRO consolidation (`zero_to_fp32`). The result is a plain float32
state dict that loads into the model without DeepSpeed.
"""

from __future__ import annotations

import glob
import os
from typing import Literal

import torch
from torch import nn

from pipeline.errors import WeightsError
from pipeline.train.ema import EMA, merge_shards

Weights = Literal["ema", "model"]
DEEPSPEED_TAG = "deepspeed"


def live_state(engine, ema: EMA | None) -> dict[str, torch.Tensor] | None:
    """The full weights on rank 0 (None on the other ranks): the EMA's when kept, else the
    engine's. Every rank must call it (it gathers partitions)."""
    if ema is not None:
        return ema.gather()
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if state is None:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Loads full weights into `model`: every parameter must be given; buffers the state lacks
    keep the model's own values (the EMA tracks parameters only)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    unknown = sorted(set(state) - set(model.state_dict()))
    if missing or unknown:
        raise WeightsError(f"weights do not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in state:
                value.copy_(state[name].to(value.dtype))
    return model


def checkpoint_state(folder: str, weights: Weights = "ema") -> tuple[dict[str, torch.Tensor], Weights]:
    """Full float32 weights from a local checkpoint folder: the EMA's (when `weights` is "ema"
    and the run kept one) or the engine's; returns them and which ones they are."""
    ema_files = sorted(glob.glob(os.path.join(folder, "ema", "rank_*.pt")))
    if weights == "ema" and ema_files:
        return merge_shards([torch.load(f, map_location="cpu", weights_only=True) for f in ema_files]), "ema"
    ds_dir = os.path.join(folder, DEEPSPEED_TAG)
    if not os.path.isdir(ds_dir):
        raise WeightsError(f"{folder}: no '{DEEPSPEED_TAG}' folder; not a checkpoint of this trainer")
    if glob.glob(os.path.join(ds_dir, "*optim_states.pt")):  # ZeRO 1-3: the fp32 master partitions
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DEEPSPEED_TAG)
    else:  # ZeRO-0: the module's weights are whole in the model-states file
        path = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
        if not os.path.exists(path):
            raise WeightsError(f"{ds_dir}: neither ZeRO partitions nor mp_rank_00_model_states.pt")
        state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k: v.float().clone() for k, v in state.items()}, "model"
