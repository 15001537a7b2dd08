"""Resuming a run on another number of workers, each new rank reading only the bytes of its own
partitions, straight from the object store.

ZeRO 1-3 partitions belong to the world that wrote them. DeepSpeed's answer, the universal
checkpoint, merges every parameter's fp32 weights and Adam moments whole (16 bytes a parameter:
~200 GB at 12B with the EMA) and has every new rank read all of it; at 12B that fits neither a
rank's time nor a node's 200 GB disk. Here instead:

1. `convert`, once per checkpoint and world change, runs one task per old rank (in parallel, Ray
   tasks on the cluster): the task reads that rank's own ZeRO file and EMA shard (1/N of the states)
   and writes them as one raw float32 file, `reshard/rank_<k>.bin`, laid out by a rule (`Layout`):
   for each key (fp32 weights, Adam's two moments, the EMA) the rank's piece of each parameter in
   order. Task 0 also writes `reshard/layout.json` (names, shapes, ZeRO layout, step, loss scale).
2. `load`, on every rank of the new world, after building its engine as for a fresh run: from the
   layout alone it knows which elements of each parameter it needs (its ZeRO-3 partition, or the
   fragment ZeRO 1/2 gives it, and its EMA slice) and where they lie in the old ranks' files; it
   fetches exactly those byte ranges (batched range requests into memory, nothing on local disk)
   and writes them into DeepSpeed's partitions (`deepspeed.utils.safe_set_local_*` for ZeRO-3, the
   parameters' fp32 fragments for ZeRO 1/2), the optimizer step and the loss scale, and the EMA.

A new rank fetches 16/M bytes per parameter (M the new world) and no node stores any of it; the
conversion's tasks each read and write 1/N of the states. ZeRO-0 states are whole on every rank
and are read as they are (`pipeline.train.checkpoint.load`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline import storage
from pipeline.errors import CheckpointMismatch
from pipeline.train.weights import DEEPSPEED_TAG

log = logging.getLogger(__name__)

FOLDER = "reshard"
DONE = "reshard.json"
"""Written beside the folder once every old rank's file is there (object stores rename nothing)."""
SHAPES = "param_shapes.json"
"""What rank 0 saves with each checkpoint: DeepSpeed's flat order of the parameters, per group."""
KEYS = ("fp32", "exp_avg", "exp_avg_sq")
"""The optimizer states of a parameter, in the order of a converted rank file (then "ema")."""
BATCH_BYTES = 256 << 20
"""Bytes a loading rank fetches per batch of range requests (its memory for the transfer)."""


def needs_conversion(zero_stage: int) -> bool:
    """Whether a checkpoint of this ZeRO stage must be converted to load on another world size."""
    return zero_stage >= 1


def converted(url: str) -> bool:
    return storage.exists(storage.join(url, DONE))


def rank_file(rank: int) -> str:
    return f"{FOLDER}/rank_{rank:05d}.bin"


@dataclass(frozen=True)
class Layout:
    """Where each element of each parameter's states lies in a converted checkpoint's rank files."""

    zero_stage: int
    world: int
    """The old world (the ranks that wrote the checkpoint)."""
    names: list[str]
    shapes: list[list[int]]
    groups: list[int]
    """Each parameter's optimizer group."""
    offsets: list[int]
    """ZeRO 1/2: each parameter's first element in its group's flat buffer (0s for ZeRO-3)."""
    partitions: list[int]
    """ZeRO 1/2: elements of each group one rank holds (empty for ZeRO-3)."""
    ema: bool
    step: int
    loss_scale: float | None

    def numel(self, index: int) -> int:
        return math.prod(self.shapes[index])

    def keys(self) -> tuple[str, ...]:
        return (*KEYS, "ema") if self.ema else KEYS

    def held(self, key: str, rank: int, index: int) -> tuple[int, int]:
        """Elements [a, b) of parameter `index`'s `key` that old rank `rank` holds (a == b: none).
        ZeRO-3 and the EMA cut every parameter into `world` equal slices; ZeRO 1/2 cut each group's
        flat buffer (parameters end to end) into `world` equal partitions."""
        n = self.numel(index)
        if key == "ema" or self.zero_stage == 3:
            size = math.ceil(n / self.world)
            return min(rank * size, n), min((rank + 1) * size, n)
        size, offset = self.partitions[self.groups[index]], self.offsets[index]
        return min(max(rank * size - offset, 0), n), min(max((rank + 1) * size - offset, 0), n)

    def owners(self, key: str, index: int, lo: int, hi: int) -> range:
        """The old ranks holding any of elements [lo, hi) of parameter `index`'s `key`."""
        if key == "ema" or self.zero_stage == 3:
            size = math.ceil(self.numel(index) / self.world)
            return range(lo // size, (hi - 1) // size + 1)
        size, offset = self.partitions[self.groups[index]], self.offsets[index]
        return range((offset + lo) // size, (offset + hi - 1) // size + 1)

    def file_offsets(self, rank: int) -> dict[tuple[str, int], int]:
        """The byte offset of each (key, parameter) piece in old rank `rank`'s file."""
        out, at = {}, 0
        for key in self.keys():
            for index in range(len(self.names)):
                out[key, index] = at
                a, b = self.held(key, rank, index)
                at += 4 * (b - a)
        out["end", -1] = at
        return out


def _read_torch(url: str) -> Any:
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def _param_shapes(url: str, rank: int, zero_stage: int) -> list[dict[str, list[int]]]:
    """DeepSpeed's flat order of the parameters per group: from the checkpoint's `param_shapes.json`,
    else (checkpoints that predate it) from DeepSpeed's own model-states file."""
    saved = storage.read_json_or_none(storage.join(url, SHAPES))
    if saved is not None:
        return [dict(group) for group in saved]
    name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    states = _read_torch(storage.join(url, DEEPSPEED_TAG, name))
    return [{k: list(v) for k, v in group.items()} for group in states["param_shapes"]]


def save_shapes(engine, folder: str) -> None:
    """Writes `param_shapes.json` for the checkpoint being saved in `folder` (rank 0)."""
    shapes = [[[name, list(shape)] for name, shape in group.items()] for group in engine._get_zero_param_shapes()]
    with open(os.path.join(folder, SHAPES), "w") as f:
        json.dump(shapes, f)


def _layout(url: str, world: int, optim: dict[str, Any], rank: int, ema: bool) -> Layout:
    zero_stage = int(optim["zero_stage"])
    groups = _param_shapes(url, rank, zero_stage)
    names = [n for g in groups for n in g]
    shapes = [list(s) for g in groups for s in g.values()]
    group_of = [i for i, g in enumerate(groups) for _ in g]
    offsets, partitions = [0] * len(names), []
    if zero_stage < 3:
        paddings = optim.get("param_alignment_paddings") or [[0] * len(g) for g in groups]
        partitions = [int(t.numel()) for t in optim["single_partition_of_fp32_groups"]]
        index = 0
        for g, group in enumerate(groups):
            at = 0
            for shape, pad in zip(group.values(), paddings[g]):
                offsets[index], at, index = at, at + math.prod(shape) + int(pad), index + 1
    base = optim["base_optimizer_state"] if zero_stage < 3 else optim["optimizer_state_dict"]
    steps = [s["step"] for s in base["state"].values() if "step" in s]
    scaler = optim.get("loss_scaler")
    return Layout(
        zero_stage=zero_stage,
        world=world,
        names=names,
        shapes=shapes,
        groups=group_of,
        offsets=offsets,
        partitions=partitions,
        ema=ema,
        step=int(steps[0]) if steps else 0,
        loss_scale=float(scaler.cur_scale) if getattr(scaler, "dynamic", False) else None,
    )


def _flat_states(optim: dict[str, Any], zero_stage: int) -> dict[str, torch.Tensor]:
    """A rank's flat fp32 weights and Adam moments (its groups end to end)."""
    if zero_stage == 3:
        base, fp32 = optim["optimizer_state_dict"], optim["fp32_flat_groups"]
    else:
        base, fp32 = optim["base_optimizer_state"], optim["single_partition_of_fp32_groups"]
    states = [base["state"][i] for i in sorted(base["state"])]
    out = {"fp32": torch.cat([t.detach().reshape(-1).float() for t in fp32])}
    for key in KEYS[1:]:
        out[key] = torch.cat([s[key].detach().reshape(-1).float() for s in states])
    return out


def convert_rank(url: str, rank: int, world: int) -> int:
    """Writes old rank `rank` of `world`'s converted file (and, rank 0, the layout); returns its bytes."""
    optim = _read_torch(storage.join(url, DEEPSPEED_TAG, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    optim = optim["optimizer_state_dict"]
    ema_url = storage.join(url, "ema", f"rank_{rank:05d}.pt")
    ema = _read_torch(ema_url)["shadow"] if storage.exists(ema_url) else None
    layout = _layout(url, world, optim, rank, ema is not None)
    flat = _flat_states(optim, layout.zero_stage)
    parts: list[np.ndarray] = []
    for key in layout.keys():
        at = 0  # where the rank's piece of the next parameter starts in its flat buffer
        for index, name in enumerate(layout.names):
            a, b = layout.held(key, rank, index)
            if key == "ema":
                parts.append(ema[name].detach().reshape(-1)[: b - a].float().numpy())
                continue
            if layout.zero_stage == 3:
                size = math.ceil(layout.numel(index) / layout.world)
                parts.append(flat[key][at : at + b - a].numpy())
                at += size
            else:  # the piece's place in this rank's partition of its group
                group = layout.groups[index]
                start = sum(layout.partitions[:group]) + layout.offsets[index] + a - rank * layout.partitions[group]
                parts.append(flat[key][start : start + b - a].numpy())
    data = np.concatenate(parts).astype("<f4").tobytes() if parts else b""
    expected = layout.file_offsets(rank)["end", -1]
    if len(data) != expected:
        raise CheckpointMismatch(
            f"{url}: rank {rank}'s states hold {len(data)} bytes where the layout needs {expected}"
        )
    storage.write_atomic(storage.join(url, rank_file(rank)), data)
    if rank == 0:
        storage.write_json(storage.join(url, FOLDER, "layout.json"), layout.__dict__)
    return len(data)


def convert(url: str, world: int, run_tasks) -> None:
    """Converts the checkpoint at `url`, written by `world` ranks, unless done: `run_tasks(fn,
    args_list)` runs `convert_rank` for every old rank (Ray tasks on the cluster; a loop in one
    process), then the marker."""
    if converted(url):
        return
    sizes = run_tasks(convert_rank, [(url, rank, world) for rank in range(world)])
    storage.write_json(storage.join(url, DONE), {"world": world, "bytes": list(sizes)})
    log.info("converted %s (%d ranks, %.1f MB) for another world size", url, world, sum(sizes) / 1e6)


def read_layout(url: str) -> Layout:
    return Layout(**storage.read_json(storage.join(url, FOLDER, "layout.json")))


@dataclass
class _Want:
    """Elements [lo, hi) of one parameter's `key` that this rank needs, gathered into `values`."""

    key: str
    index: int
    lo: int
    hi: int
    values: np.ndarray | None = None


def _wanted(engine, layout: Layout, rank: int, world: int) -> list[_Want]:
    params = dict(engine.module.named_parameters())
    zero3 = engine.zero_optimization_partition_weights()
    out = []
    for index, name in enumerate(layout.names):
        n = layout.numel(index)
        if zero3:
            size = math.ceil(n / world)
            lo, hi = min(rank * size, n), min((rank + 1) * size, n)
        else:
            mapping = getattr(params[name], "_hp_mapping", None)
            if mapping is None:
                lo = hi = 0
            else:
                lo = mapping.lp_fragment_address.start
                hi = lo + mapping.lp_fragment_address.numel
        if lo < hi:
            out += [_Want(key, index, lo, hi) for key in KEYS]
        if layout.ema:
            size = math.ceil(n / world)
            out.append(_Want("ema", index, min(rank * size, n), min((rank + 1) * size, n)))
    return out


def _fetch(url: str, layout: Layout, wants: list[_Want]) -> int:
    """Fills each want's values with range requests to the old ranks' files, a batch of at most
    `BATCH_BYTES` at a time; returns the bytes fetched."""
    fs, _ = storage.get_fs(url)
    offsets: dict[int, dict] = {}
    fetched, batch, size = 0, [], 0
    for want in [*wants, None]:
        if want is not None:
            want.values = np.zeros(want.hi - want.lo, dtype=np.float32)
            for rank in layout.owners(want.key, want.index, want.lo, want.hi):
                if rank not in offsets:
                    offsets[rank] = layout.file_offsets(rank)
                a, b = layout.held(want.key, rank, want.index)
                lo, hi = max(a, want.lo), min(b, want.hi)
                if lo < hi:
                    start = offsets[rank][want.key, want.index] + 4 * (lo - a)
                    batch.append((want, lo - want.lo, rank, start, start + 4 * (hi - lo)))
                    size += 4 * (hi - lo)
        if batch and (want is None or size >= BATCH_BYTES):
            paths = [storage.get_fs(storage.join(url, rank_file(r)))[1] for _, _, r, _, _ in batch]
            blobs = fs.cat_ranges(paths, [s for *_, s, _ in batch], [e for *_, e in batch])
            for (target, at, _, _, _), blob in zip(batch, blobs):
                if isinstance(blob, Exception):
                    raise CheckpointMismatch(f"{url}: cannot read a converted rank file: {blob}")
                piece = np.frombuffer(blob, dtype="<f4")
                target.values[at : at + piece.size] = piece
                fetched += len(blob)
            batch, size = [], 0
    return fetched


def _create_adam_states(zero_optimizer) -> None:
    """Has the optimizer create its moments and step (torch's Adam creates them at its first step):
    one step at learning rate 0 on zero gradients, which leaves every weight as it is, so the states
    exist in the optimizer's own dtypes and devices, to be overwritten with the checkpoint's. ZeRO-3
    lends its flat fp32 partitions to the optimizer's groups only around a step, as here."""
    optimizer = zero_optimizer.optimizer
    lend = getattr(zero_optimizer, "_set_fp32_optimizer_param_groups", None)
    if lend is not None:
        lend()
    try:
        bare = [p for group in optimizer.param_groups for p in group["params"] if not optimizer.state.get(p)]
        rates = [group["lr"] for group in optimizer.param_groups]
        grads = [p.grad for p in bare]
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        for p in bare:
            p.grad = torch.zeros_like(p)
        if bare:
            optimizer.step()
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        for p, grad in zip(bare, grads):
            p.grad = grad
    finally:
        if lend is not None:
            zero_optimizer._clear_fp32_optimizer_param_groups()


def load(engine, ema, url: str, rank: int, world: int) -> int:
    """Restores the converted checkpoint at `url` into `engine` (built for `world` ranks as for a
    fresh run) and `ema`; returns the bytes this rank fetched. Collective (ZeRO 1/2 gather their
    16-bit weights from the restored partitions)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    layout = read_layout(url)
    names = dict(engine.module.named_parameters())
    if sorted(names) != sorted(layout.names):
        raise CheckpointMismatch(f"{url}: its parameters are not this model's")
    wants = _wanted(engine, layout, rank, world)
    fetched = _fetch(url, layout, wants)
    zero3 = engine.zero_optimization_partition_weights()
    optimizer = engine.optimizer
    _create_adam_states(optimizer)
    if zero3:
        engine.empty_partition_cache()  # no gathered copy may outlive the partitions it came from
    elif hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._lazy_init_hp_params_optimizer_state()  # links each fragment to Adam's moments
    with torch.no_grad():
        for want in wants:
            name = layout.names[want.index]
            param, values = names[name], torch.from_numpy(want.values)
            if want.key == "ema":
                shadow = ema.shadow[name]
                shadow.zero_()
                shadow[: values.numel()].copy_(values)
            elif zero3:
                padded = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32)
                padded[: values.numel()] = values
                if want.key == "fp32":
                    safe_set_local_fp32_param(param, padded)
                    param.ds_tensor.copy_(padded.to(param.ds_tensor.dtype))
                else:
                    safe_set_local_optimizer_state(param, padded, want.key)
            else:
                fragment = param._hp_mapping.get_hp_fragment(None if want.key == "fp32" else want.key)
                fragment.copy_(values.to(fragment.dtype))
        for states in optimizer.optimizer.state.values():
            if isinstance(states.get("step"), torch.Tensor):
                states["step"].fill_(layout.step)
            elif "step" in states:
                states["step"] = layout.step
        if layout.loss_scale is not None and hasattr(optimizer, "loss_scaler"):
            optimizer.loss_scaler.cur_scale = layout.loss_scale
    if zero3:
        persistent = [p for p in names.values() if getattr(p, "ds_persist", False)]
        if persistent:
            persistent[0].all_gather(persistent)
    else:
        optimizer.update_lp_params()  # the 16-bit weights every rank holds, from the restored fp32 partitions
    engine.global_steps = layout.step
    return fetched
