"""Exponential moving average of a model's weights (the paper keeps one for the dVAE and the
transformer), sharded across the ranks: each rank keeps float32 EMA values for its slice of
every parameter, so the EMA costs 4/world bytes per parameter per rank, never a full copy.

The slices follow ZeRO-3's own partition layout (parameter flattened, padded to a multiple of
the world size, rank r holding [r·p, (r+1)·p)), so under ZeRO-3 a rank's slice is exactly its
`ds_tensor` and nothing is gathered to update it; under ZeRO 0-2 the rank cuts its slice from
the full parameter. `merge_shards` puts the slices back together (export, evaluation).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def partition_size(numel: int, world: int) -> int:
    return math.ceil(numel / world)


def _full_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))


def _local_slice(param: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's flat slice of `param` (padded with zeros to the partition size)."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3: the partition this rank already holds
        return param.ds_tensor.detach().reshape(-1).float()
    flat = param.detach().reshape(-1).float()
    size = partition_size(flat.numel(), world)
    part = flat[rank * size : (rank + 1) * size]
    if part.numel() < size:
        part = torch.cat([part, part.new_zeros(size - part.numel())])
    return part


class EMA:
    """The EMA of this rank's slice of every parameter of `model`."""

    def __init__(self, model: nn.Module, decay: float, rank: int, world: int):
        self.decay, self.rank, self.world = decay, rank, world
        self.shapes = {name: _full_shape(p) for name, p in model.named_parameters()}
        self.shadow = {name: _local_slice(p, rank, world).clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(_local_slice(param, self.rank, self.world), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "shapes": self.shapes, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["rank"] != self.rank or state["shapes"] != self.shapes:
            raise ValueError(
                f"EMA shard (rank {state['rank']} of {state['world']}) does not match this rank "
                f"({self.rank} of {self.world}) or this model"
            )
        self.shadow = {k: v.float().to(self.shadow[k].device).clone() for k, v in state["shadow"].items()}

    @torch.no_grad()
    def gather(self) -> dict[str, torch.Tensor] | None:
        """The full EMA weights on rank 0 (None elsewhere); a collective every rank must call."""
        import torch.distributed as dist

        if not dist.is_initialized() or self.world == 1:
            return merge_shards([self.state_dict()])
        out: dict[str, torch.Tensor] = {}
        for name, local in self.shadow.items():
            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)
            if self.rank == 0:
                out[name] = _assemble([p.cpu() for p in parts], self.shapes[name])
        return out if self.rank == 0 else None


def _assemble(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(parts)[: math.prod(shape)].view(shape).clone()


def merge_shards(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full float32 weights from every rank's `EMA.state_dict()` (any order)."""
    states = sorted(states, key=lambda s: s["rank"])
    world = states[0]["world"]
    if [s["rank"] for s in states] != list(range(world)):
        raise ValueError(f"EMA shards of ranks {[s['rank'] for s in states]} do not cover a world of {world}")
    shapes = states[0]["shapes"]
    return {name: _assemble([s["shadow"][name].cpu() for s in states], shape) for name, shape in shapes.items()}
