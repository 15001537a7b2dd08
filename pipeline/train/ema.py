"""Exponential moving average of a model's weights (the paper keeps one for the dVAE and the
transformer), sharded across the ranks: each rank keeps float32 EMA values for its slice of
every parameter, so the EMA costs 4/world bytes per parameter per rank, never a full copy.

The slices follow ZeRO-3's own partition layout (parameter flattened, padded to a multiple of
the world size, rank r holding [r·p, (r+1)·p)), so under ZeRO-3 a rank's slice is exactly its
`ds_tensor` and nothing is gathered to update it; under ZeRO 0-2 the rank cuts its slice from
the full parameter.

Nothing ever holds the whole EMA on one rank while training: evaluation swaps each rank's slices
into the engine's own partitions (`applied`) and back; the export streams one gathered parameter
at a time (`full_tensors`). Offline, `merged_tensors` puts saved slices back together (`dalle
export`), and `reshard` cuts a saved world's slices for another world size (resuming on M ranks
a run saved on N).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pipeline.train.collectives import all_gather


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
        """One EMA step towards the model's current weights: one batched lerp over every slice
        (a few kernel launches, not one per parameter: ~800 at 12B)."""
        names = list(self.shadow)
        params = dict(model.named_parameters())
        current = [_local_slice(params[n], self.rank, self.world) for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "shapes": self.shapes, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["world"] != self.world or state["rank"] != self.rank or state["shapes"] != self.shapes:
            raise ValueError(
                f"EMA shard (rank {state['rank']} of {state['world']}) does not match this rank "
                f"({self.rank} of {self.world}) or this model"
            )
        self.shadow = {k: v.float().to(self.shadow[k].device).clone() for k, v in state["shadow"].items()}

    def _all_parts(self, name: str) -> list[torch.Tensor]:
        """Every rank's slice of `name`, in rank order, on the collective's device (the shadow may
        live on the host, with offloaded parameters, while NCCL gathers on the GPU)."""
        return all_gather(self.shadow[name])

    @torch.no_grad()
    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full float32 EMA weight) one parameter at a time, on every rank; a collective every
        rank must drive to the end. Memory: one parameter, never the model."""
        for name, shape in self.shapes.items():
            yield name, _assemble([p.cpu() for p in self._all_parts(name)], shape)

    @torch.no_grad()
    def gather(self) -> dict[str, torch.Tensor] | None:
        """The full EMA weights on rank 0 (None elsewhere), for models small enough to hold whole on
        one rank (the dVAE, CLIP); a collective every rank must call."""
        out = dict(self.full_tensors())
        return out if self.rank == 0 else None

    @contextmanager
    def applied(self, engine) -> Iterator[None]:
        """Within the block the engine's module computes with the EMA weights, in its own dtype:
        under ZeRO-3 each rank copies its slices into its own partitions (nothing gathered);
        otherwise every rank assembles each full parameter in turn. The engine's weights are
        restored on exit. Collective.

        Under ZeRO-3 DeepSpeed keeps some parameters gathered between forwards (persistent small
        ones, and those its prefetcher expects to reuse soon); a forward would then compute with
        those stale whole copies instead of the partitions. So every gathered copy is released
        (`empty_partition_cache`) before the swap and again before the restore, and the persistent
        ones gathered back after it, as DeepSpeed does after a step."""
        module = engine.module
        params = dict(module.named_parameters())
        zero3 = any(hasattr(p, "ds_tensor") for p in params.values())
        saved: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if zero3:
                engine.empty_partition_cache()
            for name, param in params.items():
                target = param.ds_tensor if zero3 else param.data
                saved[name] = target.clone()
                value = self.shadow[name] if zero3 else _assemble(self._all_parts(name), self.shapes[name])
                target.copy_(value.reshape(target.shape).to(target.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                if zero3:
                    engine.empty_partition_cache()
                for name, param in params.items():
                    (param.ds_tensor if zero3 else param.data).copy_(saved.pop(name))
                persistent = [p for p in params.values() if getattr(p, "ds_persist", False)]
                if persistent:
                    persistent[0].all_gather(persistent)


def _assemble(parts: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat(parts)[: math.prod(shape)].view(shape).clone()


def _in_rank_order(states: list[dict]) -> list[dict]:
    states = sorted(states, key=lambda s: s["rank"])
    world = states[0]["world"]
    if [s["rank"] for s in states] != list(range(world)):
        raise ValueError(f"EMA shards of ranks {[s['rank'] for s in states]} do not cover a world of {world}")
    return states


def merged_tensors(states: list[dict]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full float32 weight) from every rank's `EMA.state_dict()` (any order), one parameter
    at a time (with memory-mapped states, only that parameter is in memory)."""
    states = _in_rank_order(states)
    for name, shape in states[0]["shapes"].items():
        yield name, _assemble([s["shadow"][name].cpu() for s in states], shape).float()


def reshard(states: list[dict], rank: int, world: int) -> dict:
    """Rank `rank` of `world`'s `EMA.state_dict()` from every saved rank's state of another world
    size (any order). One parameter is whole at a time; with the states loaded memory-mapped
    (`torch.load(mmap=True)`) only the slices read are in memory."""
    shadow = {}
    for name, full in merged_tensors(states):
        flat = full.reshape(-1)
        size = partition_size(flat.numel(), world)
        part = flat[rank * size : (rank + 1) * size]
        shadow[name] = torch.cat([part, part.new_zeros(size - part.numel())]).float()
    return {
        "rank": rank,
        "world": world,
        "shapes": {k: tuple(v) for k, v in states[0]["shapes"].items()},
        "shadow": shadow,
    }
