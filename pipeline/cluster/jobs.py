"""Recipes as Ray jobs: `dalle submit`, `dalle jobs`, `dalle logs` and `dalle stop` (Jobs API).

A job runs `python -m pipeline.cli run recipe.yaml` on the cluster. Its runtime_env carries this
package's source (`py_modules`) and the recipe as submitted (`working_dir`): overrides applied and
local paths made absolute, so a resubmission of the same recipe writes to the same `output_dir`
and resumes from the ledgers there. Nodes need the third-party dependencies installed (the
cluster definitions in `cluster/` do that).
"""

from __future__ import annotations

import asyncio
import datetime
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import pipeline
from pipeline.cluster.client import alive_nodes, autoscaling, check_recipe_fits, connect
from pipeline.cluster.driver import WORKER_ENV
from pipeline.config.recipe import apply_overrides, build_recipe
from pipeline.errors import ClusterError, RecipeError

ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RECIPE_FILE = "recipe.yaml"


def job_recipe(path: str, overrides: list[str], cwd: str) -> dict[str, Any]:
    """The recipe as the job will read it: overrides applied, local paths absolute (from `cwd`)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys")
    data = apply_overrides(data, overrides)
    build_recipe(data, path)  # validates
    absolute = lambda p: p if "://" in p else str(Path(cwd, p).resolve())
    data["output_dir"] = absolute(data["output_dir"])
    ingest = data.get("ingest") or {}
    if ingest.get("url_lists"):
        ingest["url_lists"] = [absolute(u) for u in ingest["url_lists"]]
    for section in ("dvae", "clip"):
        if (data.get(section) or {}).get("weights"):
            data[section]["weights"] = absolute(data[section]["weights"])
    return data


def submission_id(name: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"dalle-{name}-{stamp}-{secrets.token_hex(2)}"


def entrypoint(force: list[str], until: str | None) -> str:
    args = [f"--force {s}" for s in force] + ([f"--until {until}"] if until else [])
    return " ".join(["python -m pipeline.cli run", RECIPE_FILE, "--no-progress -v", *args])


SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|API_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
"""Environment variable names taken for secrets (`AWS_SECRET_ACCESS_KEY`, `WANDB_API_KEY`, ...)."""


def check_job_env(env: dict[str, str]) -> None:
    """Refuses `--env` names that dalle sets itself, and secrets."""
    clash = sorted(env.keys() & WORKER_ENV.keys())
    if clash:
        raise ClusterError(f"--env {clash[0]}: dalle sets that variable itself")
    secret = sorted(name for name in env if SECRET_NAME.search(name))
    if secret:
        raise ClusterError(
            f"--env {secret[0]}: a secret is not sent in a job's runtime_env, which the dashboard and "
            "`ray job` show to anyone who can reach the cluster; give it to the nodes' environment "
            "(a Kubernetes Secret, docker run_options: cluster/README.md)"
        )


def runtime_env(folder: str, env: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env. The driver adds WORKER_ENV itself in `ray.init`, and Ray refuses
    to merge a job's and a driver's env var of the same name, so those stay out of it."""
    check_job_env(env)
    return {
        "working_dir": folder,
        "py_modules": [str(Path(pipeline.__file__).parent)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1", **env},
    }


def submit(
    address: str,
    recipe_path: str,
    overrides: list[str] = (),
    *,
    force: list[str] = (),
    until: str | None = None,
    env: dict[str, str] | None = None,
    check_resources: bool = True,
) -> str:
    """Submits the recipe as a job after checking that it can run there; returns the submission id."""
    check_job_env(env or {})
    data = job_recipe(recipe_path, list(overrides), str(Path.cwd()))
    recipe = build_recipe(data, recipe_path)
    client = connect(address)
    if check_resources:
        check_recipe_fits(recipe, alive_nodes(client), autoscaling(client), address)
    for job in client.list_jobs():
        meta = job.metadata or {}
        if meta.get("output_dir") == recipe.output_dir and str(job.status) in ACTIVE:
            raise ClusterError(
                f"job {job.submission_id} is still {job.status} on {recipe.output_dir}; "
                f"`dalle stop {job.submission_id}` first, or wait for it"
            )
    with tempfile.TemporaryDirectory(prefix="dalle-job-") as folder:
        Path(folder, RECIPE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
        return client.submit_job(
            entrypoint=entrypoint(list(force), until),
            runtime_env=runtime_env(folder, env or {}),
            submission_id=submission_id(recipe.name),
            metadata={"recipe": recipe.name, "recipe_file": recipe_path, "output_dir": recipe.output_dir},
        )


def job_url(address: str, job_id: str) -> str:
    return f"{address}/#/jobs/{job_id}"


def list_jobs(address: str) -> list[dict[str, Any]]:
    """Every job of the cluster, newest first, as plain dicts."""
    rows = []
    for job in connect(address).list_jobs():
        meta = job.metadata or {}
        rows.append(
            {
                "id": job.submission_id or job.job_id,
                "status": str(job.status),
                "recipe": meta.get("recipe", "-"),
                "output_dir": meta.get("output_dir", "-"),
                "start": (job.start_time or 0) / 1000 or None,
                "end": (job.end_time or 0) / 1000 or None,
                "message": (job.message or "").splitlines()[0] if job.message else "",
            }
        )
    return sorted(rows, key=lambda r: r["start"] or 0, reverse=True)


def _job_status(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id))
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise ClusterError(f"no job {job_id!r} on the cluster at {client.get_address()}") from None
        raise


def logs(address: str, job_id: str, follow: bool = False, out=sys.stdout) -> str:
    """Prints the job's logs (streaming them until it ends with `follow`); returns its status."""
    client = connect(address)
    state = _job_status(client, job_id)
    if not follow:
        out.write(client.get_job_logs(job_id))
        out.flush()
        return state

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(client, job_id, timeout=30)


def wait(client, job_id: str, timeout: float) -> str:
    """Polls until the job is terminal or `timeout` passes; returns its last status."""
    deadline = time.monotonic() + timeout
    state = _job_status(client, job_id)
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        state = _job_status(client, job_id)
    return state


def stop(address: str, job_id: str, timeout: float = 60) -> str:
    """Asks the job to stop (SIGTERM, then SIGKILL after Ray's grace period); returns its status."""
    client = connect(address)
    state = _job_status(client, job_id)
    if state in TERMINAL:
        return state
    client.stop_job(job_id)
    return wait(client, job_id, timeout)
