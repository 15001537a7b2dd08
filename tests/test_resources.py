"""GPU asks come from the recipe alone, and an ask the cluster can never meet is refused in one
line instead of running on CPUs (`pipeline.engine.resources`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
from helpers import dalle

from pipeline.config.recipe import load_recipe
from pipeline.engine.executor import run_shards
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.resources import capacity_problem, pool_ask, train_ask
from pipeline.engine.tasks import Placement, ShardTask, ShardWorker, pool_placement
from pipeline.errors import ClusterError
from pipeline.observe.progress import StageProgress
from pipeline.train.trainer import wants_gpu

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.fixture
def no_cluster_queries(monkeypatch):
    """Every Ray call that reads the cluster of the moment fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("asked the cluster")

    for name in ("cluster_resources", "available_resources", "nodes", "init"):
        monkeypatch.setattr(ray, name, refuse)


@pytest.mark.parametrize(
    "recipe, encode, sample, train",
    [
        ("demo", (None, 0.0), (None, None), (False, False, False)),
        ("shapes-gpu", (None, 1.0), (None, 1.0), (True, True, True)),
        ("cc3m", (8, 1.0), None, (True, True, True)),
        ("cc3m-1.3b", (32, 1.0), None, (None, None, True)),
        ("laion-250m-12b", (64, 1.0), None, (None, None, True)),
    ],
)
def test_where_stages_run_is_a_pure_function_of_the_recipe(no_cluster_queries, recipe, encode, sample, train):
    r = load_recipe(JOBS / f"{recipe}.yaml")
    cpus = r.ray.cpus_per_task
    placement = pool_placement("encode", r.encode.actors, r.encode.gpus_per_actor, cpus)
    assert (placement.actors, placement.gpus, placement.pool) == (*encode, True)
    ask = pool_ask("encode", cpus, r.encode.gpus_per_actor)
    assert (ask.asked_by if ask else None) == (f"encode.gpus_per_actor={encode[1]:g}" if encode[1] else None)
    if sample is not None:
        assert (r.sample.actors, r.sample.gpus_per_actor) == sample
        assert (r.evaluate.actors, r.evaluate.gpus_per_actor) == sample
    # a stage that trains uses GPUs exactly when its recipe says so; given weights train nothing
    trains = [None if getattr(r, name).weights else wants_gpu(getattr(r, name).train) for name in ("dvae", "clip")]
    assert (*trains, wants_gpu(r.transformer.train)) == train
    assert not ray.is_initialized()


def test_unset_means_cpus_and_where_a_stage_runs_is_in_its_fingerprint():
    """Null (unset) asks for no GPUs and is digested as the releases before wrote it (their null
    meant "GPUs when the cluster has them": on a CPU machine, CPUs), so their CPU runs resume; a
    GPU ask changes what the stage computes (bf16) and so its fingerprint and its downstream's."""
    from pipeline.workflow import build_stages, fingerprints

    def configs(overrides: list[str]) -> dict:
        return fingerprints(build_stages(load_recipe(JOBS / "demo.yaml", overrides)))

    plain = configs([])
    assert plain["encode"].config["gpus_per_actor"] is None and plain["sample"].config["gpus_per_actor"] is None
    assert all(plain[name].config["train"]["use_gpu"] is None for name in ("dvae", "clip", "train"))
    assert pool_ask("encode", 1, None) is None and not wants_gpu(load_recipe(JOBS / "demo.yaml").transformer.train)
    changed = configs(["encode.gpus_per_actor=1"])
    assert [n for n in plain if changed[n].digest != plain[n].digest] == ["encode", "train", "sample", "evaluate"]
    changed = configs(["transformer.train.use_gpu=true"])
    assert [n for n in plain if changed[n].digest != plain[n].digest] == ["train", "sample", "evaluate"]


def test_capacity_counts_gpus_per_node_not_in_all():
    eight = {"CPU": 96.0, "GPU": 8.0}
    assert capacity_problem(train_ask("transformer", 16, 8, True).bundles, [eight, eight]) is None
    assert capacity_problem(train_ask("transformer", 17, 8, True).bundles, [eight, eight]) == (
        "17 x {CPU: 8, GPU: 1} do not fit its 2 node(s) (16 GPUs in all, at most 8 on one)"
    )
    # four 1-GPU nodes hold four 1-GPU actors, not one 2-GPU actor
    ones = [{"CPU": 4.0, "GPU": 1.0}] * 4
    assert capacity_problem(pool_ask("encode", 1, 1).bundles, ones) is None
    assert "at most 1 on one" in capacity_problem(pool_ask("encode", 1, 2).bundles, ones)
    assert capacity_problem(pool_ask("encode", 1, 0.5).bundles, [{"CPU": 2.0}]) == (
        "1 x {CPU: 1, GPU: 0.5} do not fit its 1 node(s) (0 GPUs in all, at most 0 on one)"
    )
    assert pool_ask("encode", 1, 0) is None and train_ask("transformer", 8, 8, False) is None


class Recording(ShardWorker):
    def setup(self, placement: Placement) -> None:
        raise AssertionError("a GPU pool was set up on a Ray without GPUs")

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        raise AssertionError("a shard ran")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_gpu_pool_on_a_local_ray_without_gpus_is_refused_at_once_in_one_line(tmp_path, local_ray):
    """No autoscaler manages a Ray this process started: the ask is refused before any actor
    starts, not run on CPUs. `gpu_wait_s` bounds the test should that detection ever fail (the
    other message then fails it)."""
    ledger = Ledger(str(tmp_path))
    placement = pool_placement("encode", None, 1.0, 1.0)
    with StageProgress(enabled=False) as progress, pytest.raises(ClusterError) as info:
        run_shards(
            ledger,
            [ShardTask("00000"), ShardTask("00001")],
            Recording(),
            fingerprint="f",
            label="encode",
            progress=progress,
            placement=placement,
            gpu_wait_s=20,
        )
    assert str(info.value) == (
        "stage 'encode': encode.gpus_per_actor=1 asks for GPUs, but on this machine's Ray (no autoscaler) "
        "1 x {CPU: 1, GPU: 1} do not fit its 1 node(s) (0 GPUs in all, at most 0 on one); run it on a "
        "machine or cluster with GPUs, or set encode.gpus_per_actor=0 to run on CPUs"
    )
    assert ledger.done() == {} and ledger.failures() == {}
    assert not ray.util.placement_group_table()  # nothing left asking for GPUs


def test_the_cpu_pool_of_the_same_recipe_runs(tmp_path, local_ray):
    class Worker(ShardWorker):
        def setup(self, placement: Placement) -> None:
            self.placement = placement

        def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
            attempt.write(f"{task.shard}.txt", f"gpus={self.placement.gpus:g}".encode())
            return ShardResult(samples_in=1, samples_out=1)

    ledger = Ledger(str(tmp_path))
    with StageProgress(enabled=False) as progress:
        records = run_shards(
            ledger,
            [ShardTask(f"{i:05d}") for i in range(3)],
            Worker(),
            fingerprint="f",
            label="encode",
            progress=progress,
            placement=pool_placement("encode", None, 0.0, 1.0),
        )
    assert sorted(records) == ["00000", "00001", "00002"]
    assert (tmp_path / "00002.txt").read_text() == "gpus=0"


@pytest.mark.parametrize(
    "override, field, hint",
    [
        ("encode.gpus_per_actor=1", "encode.gpus_per_actor=1", "encode.gpus_per_actor=0"),
        (
            "transformer.train.use_gpu=true",
            "transformer.train.use_gpu with 2 workers",
            "transformer.train.use_gpu=false",
        ),
    ],
)
def test_dalle_run_of_a_gpu_recipe_on_this_cpu_machine_stops_before_its_first_stage(tmp_path, override, field, hint):
    """`dalle run` (a Ray of its own, no autoscaler) refuses in one line before ingest starts, and
    leaves no stage folder behind: nothing ran, on CPUs or otherwise."""
    out = tmp_path / "out"
    result = dalle("run", str(JOBS / "demo.yaml"), f"output_dir={out}", override, "--no-progress", timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    bundle = "{CPU: 1, GPU: 1}"
    workers = 2 if "train" in override else 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"dalle: error: stage '{field.split('.')[0].replace('transformer', 'train')}': {field} asks for GPUs, but on "
        f"this machine's Ray (no autoscaler) {workers} x {bundle} do not fit its 1 node(s) (0 GPUs in all, at most 0 "
        f"on one); run it on a machine or cluster with GPUs, or set {hint} to run on CPUs"
    )
    assert not out.exists() or not any(out.iterdir())
