"""Model weights as sharded safetensors files, written one tensor at a time and read onto any device.

    model-00001.safetensors ... model-0000K.safetensors
    model.safetensors.index.json   {"metadata": {"total_size": bytes, "dtype": "bfloat16"},
                                    "weight_map": {tensor name: file}}

This is the layout of Hugging Face's sharded checkpoints, so their tools read ours. The writer holds
at most one shard (`shard_bytes`, 2 GiB by default) besides the tensor being added, never the whole
model: a 12B export streams 24.6 GB of bf16 through a few GB of host memory. The index is written
last, so a folder with an index has all its shards. The reader loads one shard at a time (memory-
mapped when local), casting each tensor to the target dtype and device as it goes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from pipeline import storage
from pipeline.models.layout import INDEX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shard_name(index: int) -> str:
    return f"model-{index:05d}.safetensors"


class ShardedWriter:
    """Writes tensors under `url` in `dtype`, cutting a new shard whenever the next tensor would
    push the current one past `shard_bytes`."""

    def __init__(self, url: str, dtype: torch.dtype, shard_bytes: int = 2 * 1024**3):
        self.url, self.dtype, self.shard_bytes = url, dtype, shard_bytes
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        value = tensor.detach().to("cpu", self.dtype).contiguous()
        size = value.numel() * value.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = value
        self._pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save

        name = shard_name(len(self.files) + 1)
        storage.write_atomic(storage.join(self.url, name), save(self._pending, metadata={"format": "pt"}))
        self.weight_map.update(dict.fromkeys(self._pending, name))
        self.files.append(name)
        self.total += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard and the index; returns every file written (the index last)."""
        if self._pending or not self.files:
            self._flush()
        index = {
            "metadata": {"total_size": self.total, "dtype": str(self.dtype).removeprefix("torch.")},
            "weight_map": self.weight_map,
        }
        storage.write_atomic(storage.join(self.url, INDEX), json.dumps(index, indent=1).encode())
        return [*self.files, INDEX]


def write_state(url: str, state: dict[str, torch.Tensor], dtype: torch.dtype) -> list[str]:
    """Writes a whole state dict (small models); returns the file names."""
    writer = ShardedWriter(url, dtype)
    for name, value in state.items():
        writer.add(name, value)
    return writer.close()


def weight_files(url: str) -> list[str]:
    """The shard names of the weights under `url` (from the index), then the index itself."""
    index = storage.read_json(storage.join(url, INDEX))
    return [*sorted(set(index["weight_map"].values())), INDEX]


def iter_tensors(
    url: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight under `url`, one shard in memory at a time, each tensor cast
    to `dtype` (its stored dtype when None) and moved to `device`."""
    from safetensors import safe_open
    from safetensors.torch import load

    for name in weight_files(url)[:-1]:
        shard = storage.join(url, name)
        if storage.is_local(shard):  # memory-mapped: only the tensor being read is in memory
            with safe_open(storage.get_fs(shard)[1], framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield key, _placed(f.get_tensor(key), device, dtype)
        else:
            tensors = load(storage.read_bytes(shard))
            for key in list(tensors):
                yield key, _placed(tensors.pop(key), device, dtype)


def _placed(value: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    # cast before the move when narrowing (bf16 crosses the bus, not fp32), after it otherwise
    if dtype is not None and dtype.itemsize < value.element_size():
        return value.to(dtype).to(device)
    return value.to(device).to(dtype or value.dtype)
