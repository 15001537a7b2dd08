"""Collectives on the device of the group's backend (`pipeline.train.collectives`).

NCCL takes no CPU tensor, and no machine here has NCCL, so the rule is checked two ways: the source
(no module of the package calls a `torch.distributed` collective except through the helpers, which
move their tensors to `backend_device()`), and the helpers themselves on a real gloo group, with every
collective they run recorded: a group of one still runs each (the GPU suite's NCCL group of one then
meets every collective of 512 ranks), on the backend's device, and hands results back where the
caller's tensors live."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.train import collectives
from pipeline.train.collectives import device_for

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
HELPERS = PACKAGE / "train" / "collectives.py"
# every torch.distributed call that moves tensors between ranks (object variants pickle into tensors)
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
    "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "barrier", "monitored_barrier",
}  # fmt: skip


def _distributed_names(tree: ast.Module) -> set[str]:
    """Names a module binds to `torch.distributed` (`import torch.distributed as dist`, ...)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def collective_calls(source: str) -> list[str]:
    """`module.function` of each torch.distributed collective the source calls or imports."""
    tree = ast.parse(source)
    aliases = _distributed_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{ast.unparse(node.func.value)}.{node.func.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.distributed"):
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in COLLECTIVES]
    return found


def test_the_checker_finds_collectives_however_torch_distributed_is_named():
    source = (
        "import torch.distributed as d\nfrom torch import distributed\nimport torch\n"
        "from torch.distributed import all_reduce\n"
        "def f(t):\n    d.all_reduce(t)\n    distributed.broadcast(t, 0)\n    torch.distributed.all_gather([t], t)\n"
    )
    assert sorted(collective_calls(source)) == [
        "d.all_reduce (line 6)",
        "distributed.broadcast (line 7)",
        "from torch.distributed import all_reduce",
        "torch.distributed.all_gather (line 8)",
    ]
    assert collective_calls("import torch.distributed as dist\nx = dist.get_rank()\n") == []


def test_no_module_runs_a_collective_except_through_the_helpers():
    offenders = {
        str(path.relative_to(PACKAGE)): calls
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != HELPERS and (calls := collective_calls(path.read_text()))
    }
    assert offenders == {}, f"collectives outside pipeline/train/collectives.py: {offenders}"
    # and the helpers move every tensor they hand a collective to the backend's device
    assert collective_calls(HELPERS.read_text())  # the checker does see them there
    assert HELPERS.read_text().count("backend_device()") >= 5


@pytest.mark.parametrize(
    ("backend", "index", "device"),
    [
        ("gloo", None, "cpu"),
        ("nccl", 3, "cuda:3"),
        ("NCCL", 0, "cuda:0"),
        ("cpu:gloo,cuda:nccl", 1, "cpu"),
        ("cuda:nccl", 2, "cuda:2"),
        ("xccl", None, "xpu"),
        ("mpi", None, "cpu"),
    ],
)
def test_the_backend_device(backend, index, device):
    assert device_for(backend, index) == torch.device(device)


@pytest.fixture()
def group_of_one(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_group_of_one_runs_every_collective_on_the_backend_device(group_of_one, monkeypatch):
    seen: list[tuple[str, torch.device]] = []
    for name in ("all_reduce", "all_gather", "broadcast_object_list"):
        real = getattr(dist, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            seen.extend((_name, t.device) for t in tensors)
            if "device" in kwargs:
                seen.append((_name, torch.device(kwargs["device"])))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, recording)
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert collectives.all_reduce_sum(values).tolist() == [1.0, 2.0]
    assert [p.tolist() for p in collectives.all_gather(torch.arange(3.0))] == [[0.0, 1.0, 2.0]]
    assert collectives.broadcast_object({"step": 4}) == {"step": 4}
    assert collectives.mean_across_ranks({"loss": 2.5}) == {"loss": 2.5}
    collectives.barrier()
    names = [name for name, _ in seen]
    assert {"all_reduce", "all_gather", "broadcast_object_list"} <= set(names)
    assert all(device == collectives.backend_device() == torch.device("cpu") for _, device in seen), seen


def test_without_a_group_the_helpers_return_their_input():
    assert not dist.is_initialized()
    values = torch.ones(2)
    assert collectives.all_reduce_sum(values) is values
    assert collectives.broadcast_object(7) == 7 and collectives.rank() == 0 and collectives.world() == 1
