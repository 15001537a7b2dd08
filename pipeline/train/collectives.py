"""The collectives the training code calls itself (DeepSpeed runs its own), each on the device of
the process group's backend.

NCCL takes only CUDA tensors; gloo takes CPU ones. A value the loop keeps on the host (a held-out
sum, an EMA shard offloaded with the parameters) goes to `backend_device()` for the collective and
comes back to where it lives, so the same code runs on a gloo group here and on Ray Train's NCCL
group on GPUs. No module of `pipeline` calls a `torch.distributed` collective except through this
one (tests/test_collectives.py checks the source).

Every helper runs the collective whenever a process group exists, a world of one included: the GPU
suite's NCCL group of one then takes the code path of 512 ranks. Without a group (one process,
nothing initialised) they return their input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialised() else 0


def world() -> int:
    return dist.get_world_size() if initialised() else 1


def device_for(backend: str, cuda_index: int | None = None) -> torch.device:
    """The device a group's tensors must live on for `backend` ("gloo", "nccl", or a per-device
    list such as "cpu:gloo,cuda:nccl"): the CPU when the backend has a CPU part, else the
    accelerator of its first device type (`cuda_index`, or the current one)."""
    pairs = [part.split(":", 1) for part in backend.lower().split(",") if part]
    if all(len(p) == 2 for p in pairs):  # "cpu:gloo,cuda:nccl": device types named explicitly
        devices = [device for device, _ in pairs]
    else:
        devices = list(dist.Backend.backend_capability.get(backend.lower(), ["cpu"]))
    if "cpu" in devices:
        return torch.device("cpu")
    kind = devices[0]
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device(kind)


def backend_device() -> torch.device:
    """Where this process's collectives take their tensors (the CPU without a group)."""
    return device_for(str(dist.get_backend())) if initialised() else torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over every rank, on the device `values` came from."""
    if not initialised():
        return values
    moved = values.to(backend_device())
    dist.all_reduce(moved)
    return moved.to(values.device)


def all_gather(local: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `local` (all the same shape), in rank order, on the backend's device."""
    if not initialised():
        return [local]
    moved = local.to(backend_device())
    parts = [torch.empty_like(moved) for _ in range(world())]
    dist.all_gather(parts, moved)
    return parts


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (pickled through a tensor on the backend's device)."""
    if not initialised():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=backend_device())
    return box[0]


def barrier() -> None:
    """Waits for every rank (through a one-element all-reduce on the backend's device, which works
    the same on gloo and NCCL)."""
    if initialised():
        dist.all_reduce(torch.zeros(1, device=backend_device()))


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the ranks (every rank gets the same dict)."""
    keys = sorted(metrics)
    values = all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, (values / world()).tolist()))
