"""One process as a world of one rank: the benchmarks build the train stage's DeepSpeed engine
(`pipeline.train.engine`) the way a Ray Train worker does, without Ray (the GPU machine has none).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config.models import TrainConfig


def init_single_rank(on_gpu: bool) -> None:
    """torch.distributed as rank 0 of 1 (NCCL on a GPU, gloo on CPU, where DeepSpeed needs
    `DS_ACCELERATOR=cpu` before it is imported)."""
    import torch.distributed as dist

    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)


def stage_engine(build: Callable[[], nn.Module], cfg: TrainConfig, on_gpu: bool):
    """The DeepSpeed engine the train loop builds for `cfg`, on a world of one."""
    from pipeline.train.engine import build_engine, build_model

    init_single_rank(on_gpu)
    torch.manual_seed(cfg.seed)
    return build_engine(build_model(build, cfg, 1, on_gpu), cfg, 1, on_gpu)


def device_name(device: torch.device) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
