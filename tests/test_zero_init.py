"""The transformer built under `deepspeed.zero.Init` (ZeRO-3, 2 ranks over gloo): each rank holds
only its partition from the start, and the gathered weights equal a plain build's for the seed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = {"layers": 2, "heads": 2, "head_dim": 8, "text_len": 8, "text_vocab": 50, "image_grid": 4, "image_vocab": 32}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.config.models import TrainConfig
    from pipeline.models.transformer import Dalle, DalleConfig
    from pipeline.train.engine import build_model
    from pipeline.train.weights import module_tensors

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(5)
    model = build_model(lambda: Dalle(DalleConfig(**CONFIG)), TrainConfig(zero_stage=3, workers=2), 2, False)
    held = {n: (p.ds_numel, p.ds_tensor.numel(), p.numel()) for n, p in model.named_parameters()}
    full = dict(module_tensors(model))
    torch.save({"held": held, "full": full}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # past this point the rank's work is on disk; a native thread left joinable (DeepSpeed's CPU
    # comm op, gloo) can abort the interpreter's teardown now and then ("terminate called
    # without an active exception"), which mp.spawn reports as a failed rank
    os._exit(0)


def test_zero_init_partitions_from_the_start_and_equals_the_plain_build(tmp_path):
    import torch.multiprocessing as mp

    from pipeline.models.transformer import Dalle, DalleConfig

    port = _free_port()
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    # DeepSpeed's shared-memory all-reduce stays off (pipeline.train.engine._deepspeed): the ranks
    # (LOCAL_SIZE set, so it would have run) left no /dev/shm segment behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    torch.manual_seed(5)
    plain = Dalle(DalleConfig(**CONFIG)).state_dict()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # a rank keeps ceil(numel / 2) of every parameter and no whole one (the module's own tensor is empty)
        assert all(part == -(-numel // 2) and whole == 0 for numel, part, whole in got["held"].values()), got["held"]
        assert got["full"].keys() == plain.keys()
        for name, value in plain.items():
            torch.testing.assert_close(got["full"][name], value, rtol=0, atol=0, msg=name)
