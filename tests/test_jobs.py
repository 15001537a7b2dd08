"""`dalle submit / jobs / logs / stop` against a real Ray cluster: `ray start --head` on
127.0.0.1 with token authentication on, started and stopped by this module.

The reduced demo is submitted, stopped in the middle of training and submitted again: the second
job must reach SUCCEEDED with every stage complete, having trained on the samples of the
uninterrupted local training of the same shards (missing 0, duplicate 0). The one-line errors:
unreachable address, missing and wrong token, GPUs the cluster lacks, a local output_dir on a cluster
of two nodes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from faults import files_holding
from helpers import (
    ENV,
    ROOT,
    TINY,
    compare_keys,
    copy_stages,
    free_port,
    kill_session,
    merge_dicts,
    small_recipe,
    train_sample_keys,
    train_step,
)

from pipeline.observe.tracking import read_metrics

pytestmark = pytest.mark.slow

# Training keeps TINY's 40 updates, so that a job can be stopped between checkpoints.
STEPS = TINY["transformer"]["train"]["steps"]


class RayHead:
    """`ray start --head --block` in its own session, every port free and on 127.0.0.1."""

    def __init__(self, tmp: Path, token: str):
        self.tmp = tmp
        self.token_file = tmp / "auth_token"
        self.token_file.write_text(token)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # jobs run `python -m pipeline.cli`: the cluster's `python` must be this interpreter
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.env = {**ENV, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}
        # secrets in the nodes' environment, where cluster/README.md tells users to put them: no
        # file, runtime_env or log of a job may hold them
        self.secrets = {name: f"marker{secrets.token_hex(12)}" for name in ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY")}
        self.env.update(self.secrets)
        self.env["RAY_metrics_report_interval_ms"] = "500"  # metrics reach the endpoint within the test
        self.procs: list[subprocess.Popen] = []
        # Ray's unix sockets live under its temp dir, and their paths may not exceed 107 bytes
        self.ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")

    def _ray_start(self, *args: str) -> None:
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats", *args]
        log = open(self.tmp / f"ray-start-{len(self.procs)}.log", "w")  # noqa: SIM115 - lives as long as the node
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log, start_new_session=True))

    def start(self) -> None:
        self._ray_start(
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={self.ray_tmp}",
        )
        headers = {"authorization": f"Bearer {self.token_file.read_text()}"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.address}/api/v0/nodes", headers=headers, timeout=5).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not come up; see {self.tmp}/ray-start-0.log")

    def metrics(self) -> str:
        """The head's Prometheus endpoint (the Ray metrics of every process on the node)."""
        port_file = next((Path(self.ray_tmp) / "session_latest").glob("metrics_export_port_*"))
        return requests.get(f"http://127.0.0.1:{port_file.read_text().strip()}/metrics", timeout=10).text

    def add_worker_node(self) -> None:
        self._ray_start(
            f"--address=127.0.0.1:{self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",
            "--num-cpus=0",
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_session(proc, rounds=50)  # the node and everything it started; its state is not kept
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    node = RayHead(tmp_path_factory.mktemp("cluster"), secrets.token_hex(16))
    node.start()
    yield node
    node.stop()


def dalle(head: RayHead, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user on the head's network would run it (the token from RAY_AUTH_TOKEN_PATH)."""
    env = env if env is not None else {**ENV, "RAY_AUTH_TOKEN_PATH": str(head.token_file)}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def submitted_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("submitted "))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, run):
    """The reduced demo, with the dVAE and CLIP the shared run trained given as weights (the dvae
    and clip stages then check them instead of training), as relative paths the job must resolve.
    Its encoded shards are the shared run's, so it trains on the samples of the shared training.
    A checkpoint every 4 updates (the same samples as every 10) slows training enough that the stop
    lands before its end on a fast hour too (it took 40 updates to come once with 10)."""
    tmp = tmp_path_factory.mktemp("jobs")
    path = small_recipe(tmp / "recipe.yaml", tmp / "out", port=free_port())
    data = merge_dicts(yaml.safe_load(path.read_text()), TINY)
    models = run[0]
    data["dvae"]["weights"] = os.path.relpath(models / "dvae" / "dvae.pt", ROOT)
    data["clip"]["weights"] = os.path.relpath(models / "clip" / "model", ROOT)
    data["transformer"]["train"]["checkpoint_every"] = 4
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def stopped(head, recipe):
    """The reduced demo submitted, and stopped with `dalle stop` once training is past checkpoint 12
    and the driver's step gauge has reached the node's metrics endpoint: its id, the stop's result,
    the step at the stop and the metrics then."""
    out = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    job_id = submitted_id(dalle(head, "submit", str(recipe), "--address", head.address))
    progress = out / "train" / "_train" / "progress.json"
    deadline = time.monotonic() + 600
    # metrics read from the first update on, so that the stop follows step 12 at once
    metrics = ""
    while train_step(progress) < 12 or not trained(metrics):
        assert time.monotonic() < deadline, "training never reached step 12 with its metrics exported"
        time.sleep(0.2)
        metrics = head.metrics() if train_step(progress) >= 1 else ""
    stop = dalle(head, "stop", job_id, "--address", head.address)
    return {"id": job_id, "stop": stop, "step": train_step(progress), "metrics": metrics, "out": out}


@pytest.fixture(scope="module")
def finished(head, recipe, stopped):
    """The stopped job submitted again with --follow, its metrics read while it runs: (submit
    result, output dir, every value of the encode stage's planned-shards gauge seen meanwhile)."""
    cmd = [sys.executable, "-m", "pipeline.cli", "submit", str(recipe), "--address", head.address, "--follow"]
    env = {**ENV, "RAY_AUTH_TOKEN_PATH": str(head.token_file)}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        planned: set[float] = set()
        while proc.poll() is None:
            planned.update(values(head.metrics(), "ray_dalle_stage_shards_planned", recipe="demo", stage="encode"))
            time.sleep(0.5)
        log.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, log.read(), "")
    return result, stopped["out"], planned


def test_submit_follows_the_job_to_succeeded_and_every_stage_is_complete(head, recipe, stopped, finished):
    result, out, _ = finished
    job_id = submitted_id(result)
    assert f"dashboard: {head.address}/#/jobs/{job_id}" in result.stdout
    assert f"job {job_id}: SUCCEEDED" in result.stdout, result.stdout[-3000:]
    assert "train done" in result.stdout  # the followed logs are the driver's

    status = dalle(head, "status", str(recipe), "--json")
    rows = json.loads(status.stdout)
    assert [r["stage"] for r in rows] == ["ingest", "filter", "text-tokenizer", "dvae", "clip", "encode", "train"]
    assert {r["stage"]: r["state"] for r in rows} == {r["stage"]: "complete" for r in rows}

    jobs = json.loads(dalle(head, "jobs", "--address", head.address, "--json").stdout)
    mine = next(j for j in jobs if j["id"] == job_id)
    assert (mine["status"], mine["recipe"], mine["output_dir"]) == ("SUCCEEDED", "demo", str(out))
    first = next(j for j in jobs if j["id"] == stopped["id"])
    assert first["status"] == "STOPPED"
    # the first job ran every stage up to training
    logs = dalle(head, "logs", stopped["id"], "--address", head.address)
    assert logs.returncode == 0 and "encode done" in logs.stdout


def test_no_secret_reaches_the_jobs_files_runtime_env_or_logs(head, stopped, finished):
    result, out, _ = finished
    markers = [*head.secrets.values(), head.token_file.read_text().strip()]
    headers = {"authorization": f"Bearer {head.token_file.read_text().strip()}"}
    for job_id in (stopped["id"], submitted_id(result)):
        info = requests.get(f"{head.address}/api/jobs/{job_id}", headers=headers, timeout=10)
        assert info.ok and info.json()["runtime_env"]["working_dir"], info.text[:500]
        logs = dalle(head, "logs", job_id, "--address", head.address)
        assert logs.returncode == 0 and "train" in logs.stdout
        for marker in markers:
            assert marker not in info.text and marker not in logs.stdout + logs.stderr + result.stdout
    assert files_holding(out, [m.encode() for m in markers]) == []


def test_a_job_stopped_in_the_middle_of_training_resumes_when_resubmitted(stopped, finished, trained):
    job_id, stop, metrics = stopped["id"], stopped["stop"], stopped["metrics"]
    assert stop.returncode == 0 and f"job {job_id}: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert stopped["step"] < STEPS, "the stop came too late"
    # the driver's named metrics, as Prometheus scrapes them from the node
    assert 0 < metric(metrics, "ray_dalle_stage_shards_done", recipe="demo", stage="train") <= STEPS
    assert metric(metrics, "ray_dalle_stage_shards_planned", recipe="demo", stage="train") == STEPS

    result, out, planned = finished
    assert f"job {submitted_id(result)}: SUCCEEDED" in result.stdout, result.stdout[-3000:]
    # in the second job, a stage complete before it started counts as one unit, and is exported
    assert 1.0 in planned, planned
    assert json.loads((out / "train" / "_done.json").read_text())["step"] == STEPS
    resumed = [m["resumed_from"] for m in read_metrics(str(out / "train" / "metrics.jsonl")) if "resumed_from" in m]
    assert len(resumed) == 1 and resumed[0] >= 10
    # the same samples in the same order as the uninterrupted (local) training of the same shards
    got, want = train_sample_keys(out), train_sample_keys(trained)
    assert compare_keys(got, want) == {"missing": 0, "duplicate": 0, "extra": 0}
    assert got == want


def trained(metrics: str) -> float:
    """The train stage's exported step, 0 until the driver's gauge shows one."""
    try:
        return metric(metrics, "ray_dalle_stage_shards_done", recipe="demo", stage="train")
    except AssertionError:
        return 0.0


def values(text: str, name: str, **labels: str) -> list[float]:
    """The values of every series `name` carrying `labels` in a Prometheus exposition."""
    found = []
    for line in text.splitlines():
        series = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if series and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', series.group(1))).items():
            found.append(float(series.group(2)))
    return found


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the (first) series `name` carrying `labels` in a Prometheus exposition."""
    found = values(text, name, **labels)
    if not found:
        raise AssertionError(f"no {name} {labels} among the node's metrics:\n{text[-2000:]}")
    return found[0]


def test_a_second_job_on_a_busy_output_dir_is_refused(head, recipe, finished, tmp_path):
    _, ref, _ = finished
    out = tmp_path / "out"
    copy_stages(ref, out, ["ingest", "filter", "text-tokenizer", "dvae", "clip"])
    data = {**yaml.safe_load(recipe.read_text()), "output_dir": str(out)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    first = submitted_id(dalle(head, "submit", str(path), "--address", head.address))
    try:
        second = dalle(head, "submit", str(path), "--address", head.address)
        _one_line_error(second, f"job {first} is still ")
        assert f"on {out}; `dalle stop {first}` first, or wait for it" in second.stderr
    finally:
        dalle(head, "stop", first, "--address", head.address)


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dalle: error:"), result.stderr
    assert fragment in lines[0], lines[0]


def test_token_errors_and_an_unreachable_address(head, recipe, tmp_path):
    no_token = {k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(tmp_path)}
    _one_line_error(
        dalle(head, "jobs", "--address", head.address, env=no_token),
        f"the cluster at {head.address} requires a token and none was found",
    )
    _one_line_error(
        dalle(head, "jobs", "--address", head.address, env={**no_token, "RAY_AUTH_TOKEN": "not-the-token"}),
        "refused the token from RAY_AUTH_TOKEN: it is not this cluster's token",
    )
    _one_line_error(
        dalle(head, "jobs", "--address", head.address, env={**no_token, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "x")}),
        f"RAY_AUTH_TOKEN_PATH={tmp_path / 'x'}: cannot read the token file",
    )
    # the token in ~/.ray/auth_token, as `ray start` leaves it on the head
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(head.token_file.read_text())
    assert dalle(head, "jobs", "--address", head.address, env=no_token).returncode == 0

    dead = f"http://127.0.0.1:{free_port()}"
    _one_line_error(dalle(head, "submit", str(recipe), "--address", dead), f"cannot reach the Ray dashboard at {dead}")
    _one_line_error(dalle(head, "logs", "dalle-nope", "--address", head.address), "no job 'dalle-nope'")
    _one_line_error(dalle(head, "jobs", "--address", "ray://127.0.0.1:10001"), "that is the Ray Client port")


def test_a_recipe_asking_for_gpus_the_cluster_lacks_is_refused(head, recipe):
    result = dalle(head, "submit", str(recipe), "transformer.train.use_gpu=true", "--address", head.address)
    _one_line_error(
        result, f"transformer.train.workers=2 with use_gpu asks for 2 GPUs but the cluster at {head.address} has 0"
    )
    result = dalle(head, "submit", str(recipe), "encode.gpus_per_actor=1", "--address", head.address)
    _one_line_error(result, "encode.gpus_per_actor=1.0 asks for 1 GPUs")


def test_a_local_output_dir_on_two_nodes_is_refused(head, recipe):
    """Last in the module: it adds a second node to the cluster."""
    head.add_worker_node()
    deadline = time.monotonic() + 60
    headers = {"authorization": f"Bearer {head.token_file.read_text()}"}
    nodes = lambda: requests.get(f"{head.address}/api/v0/nodes", headers=headers, timeout=5).json()["data"]["result"]
    while len([n for n in nodes()["result"] if n["state"] == "ALIVE"]) < 2:
        assert time.monotonic() < deadline, "the second node never joined"
        time.sleep(0.5)
    out = yaml.safe_load(recipe.read_text())["output_dir"]
    result = dalle(head, "submit", str(recipe), "--address", head.address)
    _one_line_error(result, f"output_dir {out} is a local path but the cluster at {head.address} has 2 nodes")
