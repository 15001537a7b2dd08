"""Sharded safetensors weights: cut by size, indexed last, read back in any dtype, loaded by
`load_dalle` on the meta device without a float32 detour."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.transformer import Dalle, DalleConfig, load_dalle, save_dalle
from pipeline.models.weight_files import INDEX, ShardedWriter, iter_tensors, weight_files

TINY = DalleConfig(layers=2, heads=2, head_dim=8, text_len=8, text_vocab=40, image_grid=4, image_vocab=32)


def test_writer_cuts_shards_by_size_and_indexes_every_tensor(tmp_path):
    tensors = {f"t{i}": torch.full((64,), float(i)) for i in range(5)}  # 256 bytes each in fp32
    writer = ShardedWriter(str(tmp_path), torch.float32, shard_bytes=600)
    for name, value in tensors.items():
        writer.add(name, value)
        assert not (tmp_path / INDEX).exists()  # the index comes last
    files = writer.close()
    assert files == ["model-00001.safetensors", "model-00002.safetensors", "model-00003.safetensors", INDEX]
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["weight_map"] == {"t0": files[0], "t1": files[0], "t2": files[1], "t3": files[1], "t4": files[2]}
    assert index["metadata"] == {"total_size": 5 * 256, "dtype": "float32"}
    assert weight_files(str(tmp_path)) == files
    back = dict(iter_tensors(str(tmp_path), dtype=torch.bfloat16))
    assert set(back) == set(tensors) and all(v.dtype == torch.bfloat16 for v in back.values())
    for name, value in tensors.items():
        torch.testing.assert_close(back[name].float(), value)
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t4", tensors["t4"])


def test_load_dalle_builds_on_meta_and_takes_the_stored_tensors(tmp_path):
    torch.manual_seed(0)
    model = Dalle(TINY)
    save_dalle(model, str(tmp_path / "fp32"))
    loaded = load_dalle(str(tmp_path / "fp32"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    save_dalle(model, str(tmp_path / "bf16"), torch.bfloat16)
    half = load_dalle(str(tmp_path / "bf16"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in half.parameters())
    up = load_dalle(str(tmp_path / "bf16"), dtype=torch.float32)
    torch.testing.assert_close(up.image_head.weight, model.image_head.weight.bfloat16().float())
