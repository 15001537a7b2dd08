"""A GPU ask on an autoscaling cluster that starts without GPUs: the ask makes the autoscaler start a
GPU node and the stage runs there; an ask it can never meet stops in one line after
`ray.gpu_wait_s`, never on CPUs; a CPU stage on a cluster with GPUs stays on CPUs and says so.

The cluster is Ray's own autoscaler (v1) over its fake multi-node provider: `ray start --head`,
worker nodes started as processes on this machine, all in one session the module kills at the
end. Each test's driver is a fresh `python` process, as `dalle run` is: Ray Data keeps state from
an earlier Ray session of the same process (the other modules' local Rays) that breaks its pools
in a later one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ENV, ROOT, free_port, kill_session

pytestmark = pytest.mark.slow

GPU_NODE = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}
ENV_NO_TOKEN = {**ENV, "RAY_AUTH_MODE": "disabled"}


def fake_cluster_config(gcs_port: int) -> dict:
    """A cluster launcher config for Ray's fake multi-node provider: a head without GPUs and one
    node type of one GPU, at most one such node (what Ray's `AutoscalingCluster` writes; that
    class runs `ray stop --force`, which would stop every Ray on the machine)."""
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    return {
        "cluster_name": "fake",
        "max_workers": 1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_node": GPU_NODE,
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "docker": {},
        **{key: [] for key in empty},
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "auth": {"ssh_user": "ubuntu"},
    }


@pytest.fixture(scope="module")
def cluster():
    """The GCS address of a fresh autoscaling cluster with no GPU node yet."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    (tmp / "cluster.json").write_text(json.dumps(fake_cluster_config(port)))
    env = {**ENV_NO_TOKEN, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--include-dashboard=false",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--autoscaling-config={tmp / 'cluster.json'}",
        "--num-cpus=1",
        "--num-gpus=0",
        f"--temp-dir={tmp}",
    ]
    log = open(tmp / "ray-start.log", "w")  # noqa: SIM115 - lives as long as the cluster
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while drive(address, "out['gpus'] = ray.cluster_resources().get('GPU', 0)", check=False) is None:
            assert time.monotonic() < deadline and head.poll() is None, (tmp / "ray-start.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        kill_session(head, rounds=50)  # the head, its autoscaler and the nodes it started
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


DRIVER = """
import json, logging, sys, tempfile
import ray
from pipeline.engine.executor import run_shards
from pipeline.engine.ledger import Attempt, Ledger, ShardResult
from pipeline.engine.resources import await_gpus, pool_ask, train_ask
from pipeline.engine.tasks import Placement, ShardTask, ShardWorker, pool_placement
from pipeline.errors import ClusterError
from pipeline.observe.progress import StageProgress

class GpuIds(ShardWorker):  # defined in __main__: Ray pickles it by value
    def process(self, task, attempt):
        attempt.write(f"{task.shard}.txt", json.dumps(ray.get_gpu_ids()).encode())
        return ShardResult(samples_in=1, samples_out=1)

def pool(gpus, shards=1, wait_s=180):
    folder = tempfile.mkdtemp()
    with StageProgress(enabled=False) as progress:
        run_shards(Ledger(folder), [ShardTask(f"{i:05d}") for i in range(shards)], GpuIds(), fingerprint="f",
                   label="encode", progress=progress, placement=pool_placement("encode", None, gpus, 1.0),
                   gpu_wait_s=wait_s)
    return [json.loads(open(f"{folder}/{i:05d}.txt").read()) for i in range(shards)]

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="WARNING")
out = {}
try:
"""


def drive(address: str, body: str, check: bool = True) -> dict | None:
    """Runs `body` in a fresh driver attached to `address` (`out` is what it returns, plus the
    one-line ClusterError and the log lines as "error" and "log"); None when it cannot attach."""
    code = DRIVER + textwrap.indent(textwrap.dedent(body), "    ")
    code += "\nexcept ClusterError as err:\n    out['error'] = str(err)\nprint('OUT', json.dumps(out))\n"
    result = subprocess.run(
        [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=400, env=ENV_NO_TOKEN, cwd=ROOT
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("OUT ")]
    if not lines:
        assert not check, result.stderr[-3000:]
        return None
    return {**json.loads(lines[-1][4:]), "log": result.stderr}


def test_a_gpu_pool_makes_the_autoscaler_start_a_gpu_node_and_runs_there(cluster):
    out = drive(cluster, "out['before'] = ray.cluster_resources().get('GPU', 0); out['ids'] = pool(1.0, shards=2)")
    assert "error" not in out, out["error"]
    assert out["before"] == 0 and out["ids"] == [[0], [0]]  # each shard ran on the GPU the ask brought


def test_an_ask_the_autoscaler_cannot_meet_stops_in_one_line_after_gpu_wait_s(cluster):
    body = """
        try:
            await_gpus("train", train_ask("transformer", 2, 1, True), 10)
        finally:
            out["probes"] = [pg["state"] for pg in ray.util.placement_group_table().values()]
    """
    out = drive(cluster, body)
    assert re.fullmatch(
        r"stage 'train': transformer\.train\.use_gpu with 2 workers asks for 2 GPUs and they did not come within "
        r"10 s \(the cluster has [01]\); it has no GPU node type or its autoscaler cannot start one \(`ray status` "
        r"on the head says which\): add one, raise ray\.gpu_wait_s, or set transformer\.train\.use_gpu=false to run "
        r"on CPUs",
        out["error"],
    ), out
    # the probe asks for nothing any more: the autoscaler is not left starting nodes for it
    assert out["probes"] and all(state == "REMOVED" for state in out["probes"])


def test_a_cpu_pool_on_a_cluster_with_gpus_stays_on_cpus_and_says_so(cluster):
    body = """
        await_gpus("encode", pool_ask("encode", 1, 1), 180)  # the GPU node is up (started now if need be)
        out["ids"] = pool(None)
    """
    out = drive(cluster, body)
    assert "error" not in out, out["error"]
    assert out["ids"] == [[]]  # the actor was given no GPU
    assert (
        "encode: runs on CPUs, as encode.gpus_per_actor (unset or 0) asks, though the cluster has 1 GPUs" in out["log"]
    )
