"""The pure parts of talking to a cluster: where the token comes from (Ray's CLI order), the
dashboard address, what a recipe needs of a cluster, and the recipe a job is sent. The real
cluster is in test_jobs.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import dalle

from pipeline.cluster.client import autoscaling_status, check_recipe_fits, dashboard_address, find_token, gpu_demand
from pipeline.cluster.jobs import entrypoint, job_recipe, runtime_env
from pipeline.config.recipe import build_recipe, load_recipe
from pipeline.errors import ClusterError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "demo.yaml"


def test_token_sources_in_rays_order(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "file").write_text(" from-file \n")
    env = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}
    assert find_token(env, home=tmp_path).value == "from-env"
    token = find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}, home=tmp_path)
    assert (token.value, token.source) == ("from-file", f"RAY_AUTH_TOKEN_PATH={tmp_path / 'file'}")
    assert find_token({}, home=tmp_path).value == "from-home"
    assert find_token({}, home=tmp_path / "nowhere") is None
    with pytest.raises(ClusterError, match="cannot read the token file"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home=tmp_path)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClusterError, match="the token file is empty"):
        find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "empty")}, home=tmp_path)


def test_dashboard_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dashboard_address("http://head:8265/") == "http://head:8265"
    assert dashboard_address("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert dashboard_address(None) == "https://ray.example.com"
    with pytest.raises(ClusterError, match="Ray Client port"):
        dashboard_address("ray://head:10001")
    with pytest.raises(ClusterError, match="give the dashboard's URL"):
        dashboard_address("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match="no cluster address"):
        dashboard_address(None)


def test_gpu_demand_is_the_largest_stage():
    recipe = load_recipe(ROOT / "jobs" / "cc3m-1.3b.yaml")
    assert gpu_demand(recipe) == (64.0, "transformer.train.workers=64 with use_gpu")
    assert gpu_demand(load_recipe(DEMO)) == (0.0, "")  # the demo runs on CPUs
    assert gpu_demand(load_recipe(DEMO, ["encode.gpus_per_actor=0.5"])) == (0.5, "encode.gpus_per_actor=0.5")
    # given dVAE weights are checked, not trained: their training section asks for nothing
    dvae = load_recipe(DEMO, ["dvae.train.use_gpu=true", "dvae.train.workers=8"])
    assert gpu_demand(dvae) == (8.0, "dvae.train.workers=8 with use_gpu")


def _node(gpus: float = 0) -> dict:
    return {"resources_total": {"CPU": 8.0, **({"GPU": gpus} if gpus else {})}}


def test_check_recipe_fits():
    local = load_recipe(DEMO)
    check_recipe_fits(local, [_node()], scaling=False, address="A")
    with pytest.raises(ClusterError, match="output_dir .* is a local path but the cluster at A has 2 nodes"):
        check_recipe_fits(local, [_node(), _node()], scaling=False, address="A")
    check_recipe_fits(load_recipe(DEMO, ["ray.shared_filesystem=true"]), [_node(), _node()], False, "A")
    # a head alone that an autoscaler will grow: its workers would write their own disks too
    with pytest.raises(ClusterError, match="output_dir .* is a local path but an autoscaler may add nodes to the"):
        check_recipe_fits(local, [_node()], scaling=True, address="A")
    check_recipe_fits(load_recipe(DEMO, ["ray.shared_filesystem=true"]), [_node()], True, "A")
    check_recipe_fits(load_recipe(DEMO, ["output_dir=s3://b/x"]), [_node()], True, "A")
    check_recipe_fits(local, [_node()], scaling=None, address="A")  # not known yet: one node is one node
    gpu = load_recipe(DEMO, ["output_dir=s3://b/x", "transformer.train.use_gpu=true"])
    with pytest.raises(ClusterError, match="asks for 2 GPUs but the cluster at A has 1"):
        check_recipe_fits(gpu, [_node(), _node(1)], scaling=False, address="A")
    check_recipe_fits(gpu, [_node(), _node(1)], scaling=True, address="A")  # the autoscaler may add them
    check_recipe_fits(gpu, [_node(), _node(1)], scaling=None, address="A")  # it may; the stage bounds its wait
    check_recipe_fits(gpu, [_node(1), _node(1)], scaling=False, address="A")


def _v1_status(mapping: dict[str, str]) -> dict:
    """The dashboard's `/api/cluster_status` data as a v1 monitor writes it (keys camel-cased by
    the dashboard, as seen from `ray start --head` on Ray 2.60)."""
    report = {"activeNodes": {}, "pendingLaunches": {}, "nodeTypeMapping": mapping, "legacy": True}
    return {
        "autoscalingStatus": "Cluster status: 0 nodes\nWorker node types:",
        "clusterStatus": {"autoscalerReport": report},
    }


def test_only_a_read_only_provider_reads_as_no_autoscaler():
    node = "7547710fee6ab663f797e02ec6b3a178cda9b0233688007e6508092c"
    # `ray start` on every node: Ray's read-only provider names each node's type after the node
    assert not autoscaling_status(_v1_status({node: f"node_{node}"}))
    # a v1 autoscaler (`ray up`) before it started any worker: no worker types listed, yet it scales
    assert autoscaling_status(_v1_status({"10.0.0.5": "ray.head.default"}))
    # the v2 autoscaler (`ray up` and KubeRay default) writes no v1 status; its own formatted one,
    # as a head started with RAY_enable_autoscaler_v2=1 and no provider (read-only) shows it
    v2 = {"autoscalingStatus": None, "autoscalingError": None, "clusterStatus": None}
    text = (
        "======== Autoscaler status: 2026-12-07 14:51:22.522630 ========\nNode status\n-----\nActive:\n"
        " (no active nodes)\nIdle:\n 1 {}\nPending:\n (no pending nodes)\nRecent failures:\n (no failures)\n\n"
        "Resources\n-----\nTotal Usage:\n 0.0/1.0 CPU\n"
    )
    assert autoscaling_status(v2, text.format(f"node_{node}")) is False
    assert autoscaling_status(v2, text.format("headgroup")) is True  # KubeRay's head group, scaled by v2
    # a head started moments ago, whose v1 monitor has not reported yet: not known
    assert autoscaling_status(v2, "No cluster status. It may take a few seconds for the Ray internal services") is None


def test_the_job_gets_the_recipe_with_overrides_and_absolute_paths(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data["ingest"] = {"url_lists": ["lists/a.tsv", "s3://b/c.tsv"]}
    data["dvae"] = {"weights": "models/dall_e"}
    data["evaluate"] = None  # it needs the synthetic set
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    sent = job_recipe(str(path), ["filter.shard_size=7"], cwd=str(tmp_path))
    assert sent["output_dir"] == str(tmp_path / "runs" / "demo")
    assert sent["ingest"]["url_lists"] == [str(tmp_path / "lists" / "a.tsv"), "s3://b/c.tsv"]
    assert sent["dvae"]["weights"] == str(tmp_path / "models" / "dall_e")
    assert build_recipe(sent).filter.shard_size == 7
    assert (
        entrypoint(["filter"], "encode")
        == "python -m pipeline.cli run recipe.yaml --no-progress -v --force filter --until encode"
    )
    env = runtime_env(str(tmp_path), {"WANDB_MODE": "offline"})
    assert env["py_modules"] == [str(ROOT / "pipeline")] and env["working_dir"] == str(tmp_path)
    with pytest.raises(ClusterError, match="--env NO_ALBUMENTATIONS_UPDATE: dalle sets that variable itself"):
        runtime_env(str(tmp_path), {"NO_ALBUMENTATIONS_UPDATE": "0"})


@pytest.mark.parametrize(
    "name", ["AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "RAY_AUTH_TOKEN", "HF_TOKEN", "db_password"]
)
def test_a_secret_is_refused_in_the_jobs_runtime_env(tmp_path, name):
    with pytest.raises(ClusterError, match=f"--env {name}: a secret is not sent in a job's runtime_env"):
        runtime_env(str(tmp_path), {"WANDB_MODE": "offline", name: "marker"})


def test_submit_refuses_a_secret_in_env_before_connecting(tmp_path):
    result = dalle("submit", "jobs/demo.yaml", "--address", "http://127.0.0.1:9", "--env", "WANDB_API_KEY=marker")
    assert result.returncode == 2 and "--env WANDB_API_KEY: a secret is not sent" in result.stderr
    assert "marker" not in result.stderr + result.stdout
