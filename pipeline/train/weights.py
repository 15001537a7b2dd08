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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from pipeline import storage
from pipeline.errors import WeightsError
from pipeline.train.ema import EMA, merged_tensors

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


def module_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter and buffer of the engine's module, one at a time: under
    ZeRO-3 each parameter is gathered for its turn only. A collective every rank must drive to the end."""
    params = dict(module.named_parameters())
    for name, value in module.state_dict(keep_vars=True).items():
        if name in params and hasattr(value, "ds_tensor"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([value]):
                yield name, value.detach().clone()
        else:
            yield name, value.detach()


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


@contextmanager
def checkpoint_tensors(
    url: str, weights: Weights = "ema"
) -> Iterator[tuple[Iterator[tuple[str, torch.Tensor]], Weights]]:
    """(name, full float32 weight) of a checkpoint folder (local or fsspec URL), and which weights they
    are: the EMA's (when `weights` is "ema" and the run kept one), fetched alone (4 bytes per parameter,
    not the optimizer states) and merged one parameter at a time from memory-mapped shards; or the
    engine's, from DeepSpeed's files (the ZeRO fp32 master partitions through `zero_to_fp32`)."""
    ema_url = storage.join(url, "ema")
    if weights == "ema" and storage.list_names(ema_url, ".pt"):
        with storage.local_copy(ema_url) as folder:
            files = sorted(glob.glob(os.path.join(folder, "rank_*.pt")))
            states = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
            yield merged_tensors(states), "ema"
        return
    ds_url = storage.join(url, DEEPSPEED_TAG)
    if not storage.exists(ds_url):
        raise WeightsError(f"{url}: no '{DEEPSPEED_TAG}' folder; not a checkpoint of this trainer")
    with storage.local_copy(ds_url) as ds_dir:
        if glob.glob(os.path.join(ds_dir, "*optim_states.pt")):  # ZeRO 1-3: the fp32 master partitions
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ds_dir), tag=os.path.basename(ds_dir))
        else:  # ZeRO-0: the module's weights are whole in the model-states file
            path = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
            if not os.path.exists(path):
                raise WeightsError(f"{ds_url}: neither ZeRO partitions nor mp_rank_00_model_states.pt")
            state = torch.load(path, map_location="cpu", weights_only=False)["module"]
        yield ((k, v.float()) for k, v in state.items()), "model"
