"""Talking to a Ray cluster's dashboard: where it is, its token, its nodes, and whether a recipe
can run there.

Token authentication (on by default for `ray start --head` in Ray 2.60) is handled the way Ray's
own CLI finds the token: `RAY_AUTH_TOKEN`, else the file named by `RAY_AUTH_TOKEN_PATH`, else
`~/.ray/auth_token`. The token is sent as a header on every request, so nothing depends on
`RAY_AUTH_MODE` being set in this process.
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config.recipe import Recipe
from pipeline.errors import ClusterError, one_line

READ_ONLY_TYPE = re.compile(r"node_[0-9a-f]{56}")
"""How Ray's read-only provider (a cluster without an autoscaler) names a node's type: after its id."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str
    """Where it came from, for error messages (never the value itself)."""


def find_token(env: dict[str, str] | None = None, home: Path | None = None) -> Token | None:
    """The cluster token from the places Ray's CLI reads, in its order; None when there is none."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return Token(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file: {err.strerror}") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path}")
    path = (home or Path.home()) / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return Token(path.read_text().strip(), str(path))
    return None


def dashboard_address(address: str | None, recipe: Recipe | None = None) -> str:
    """The dashboard's HTTP address from `--address`, `RAY_ADDRESS` or the recipe's `ray.address`."""
    candidates = [address, os.environ.get("RAY_ADDRESS"), recipe.ray.address if recipe else None]
    address = next((a for a in candidates if a), None)
    if address is None:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address.startswith("ray://"):
        raise ClusterError(
            f"address {address}: that is the Ray Client port; jobs go to the dashboard, e.g. http://HEAD:8265"
        )
    if "://" not in address:
        if address == "auto" or ":" not in address:
            raise ClusterError(f"address {address!r}: give the dashboard's URL, e.g. --address http://HEAD:8265")
        address = f"http://{address}"
    return address.rstrip("/")


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fails fast with one line when nothing listens at `address` (requests would wait minutes)."""
    url = urllib.parse.urlsplit(address)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({reason}); is the head node up and its port {port} open?"
        ) from None


def connect(address: str):
    """A `JobSubmissionClient` for `address` that sends the cluster token when there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _probe(address)
    token = find_token()
    headers = {"authorization": f"Bearer {token.value}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        if token is None:
            raise ClusterError(
                f"the cluster at {address} requires a token and none was found in RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; copy the head node's ~/.ray/auth_token "
                "(`ray get-auth-token` on the head prints it)"
            ) from None
        if "Forbidden" in str(err):
            raise ClusterError(
                f"the cluster at {address} refused the token from {token.source}: it is not this cluster's token"
            ) from None
        raise ClusterError(f"the cluster at {address} refused us: {one_line(err, typed=False)}") from None
    except ConnectionError:
        raise ClusterError(f"cannot reach the Ray dashboard at {address}: is it a Ray dashboard?") from None
    except RuntimeError as err:
        raise ClusterError(f"the Ray dashboard at {address} answered: {one_line(err, typed=False)}") from None


def get_json(client, endpoint: str) -> Any:
    """GET a dashboard endpoint with the client's headers; its `data` member."""
    response = client._do_request("GET", endpoint)
    if response.status_code != 200:
        raise ClusterError(f"{client.get_address()}{endpoint}: status {response.status_code}")
    return response.json()["data"]


def alive_nodes(client) -> list[dict[str, Any]]:
    """The cluster's alive nodes (state API): node_id, is_head_node, resources_total, ..."""
    data = get_json(client, "/api/v0/nodes?limit=10000&detail=1")
    return [n for n in data["result"]["result"] if n["state"] == "ALIVE"]


def autoscaling(client, wait_s: float = 20.0) -> bool | None:
    """Whether an autoscaler may add nodes to the cluster (so GPUs it lacks now may come, and a
    head alone may grow). A head started moments ago may not have said yet: asks again for up to
    `wait_s`, then answers None (not known)."""
    deadline = time.monotonic() + wait_s
    while True:
        data = get_json(client, "/api/cluster_status")
        formatted = "" if data.get("clusterStatus") else get_json(client, "/api/cluster_status?format=1")
        answer = autoscaling_status(data, (formatted or {}).get("clusterStatus") or "")
        if answer is not None or time.monotonic() > deadline:
            return answer
        time.sleep(1.0)


def autoscaling_status(data: dict[str, Any], formatted: str = "") -> bool | None:
    """`autoscaling` from the dashboard's `/api/cluster_status` data (and, when that holds no v1
    status, its `?format=1` text); None while it cannot tell yet. Only "no autoscaler" can be read
    there for certain: the v1 monitor of a cluster started with `ray start` on each node runs Ray's
    read-only provider, which names every node's type after the node (`node_<id>`, Ray's
    `format_readonly_node_type`). A v1 autoscaler names real types (its list of worker types is
    empty while none runs, so that list says nothing). The v2 autoscaler (the default of `ray up`
    and KubeRay since Ray 2.50) writes no v1 status; the formatted text then comes from it, and
    lists each node under its type (`1 node_<id>` again for a read-only provider), where a v1
    monitor that has not reported yet answers "No cluster status"."""
    report = (data.get("clusterStatus") or {}).get("autoscalerReport") or {}
    mapping = report.get("nodeTypeMapping") or {}
    if mapping:
        return any(kind != f"node_{node}" for node, kind in mapping.items())
    if not formatted or formatted.startswith("No cluster status"):
        return None
    section = formatted.partition("Node status")[2].partition("Resources")[0]
    types = re.findall(r"^ +\d+ (\S+)$", section, flags=re.MULTILINE)
    return not types or not all(READ_ONLY_TYPE.fullmatch(t) for t in types)


def gpu_demand(recipe: Recipe) -> tuple[float, str]:
    """The most GPUs any one stage of the recipe needs at once, and the field that asks for them."""
    asks: list[tuple[float, str]] = [(0.0, "")]
    trained = [("dvae", recipe.dvae, recipe.dvae.weights is None), ("clip", recipe.clip, recipe.clip.weights is None)]
    trained.append(("transformer", recipe.transformer, True))
    for name, section, trains in trained:
        if trains and section.train.use_gpu:
            asks.append((float(section.train.workers), f"{name}.train.workers={section.train.workers} with use_gpu"))
    for name in ("encode", "sample", "evaluate"):
        section = getattr(recipe, name)
        if section is not None and section.gpus_per_actor:
            asks.append((section.gpus_per_actor, f"{name}.gpus_per_actor={section.gpus_per_actor}"))
    return max(asks)


def stage_devices(recipe: Recipe) -> dict[str, str]:
    """Where each stage that runs models runs, as its recipe says (`dalle plan` shows it)."""
    out: dict[str, str] = {}
    stages = ("dvae", "dvae"), ("clip", "clip"), ("encode", "encode"), ("train", "transformer")
    for stage, key in (*stages, ("sample", "sample"), ("evaluate", "evaluate")):
        section = getattr(recipe, key)
        if section is None:
            continue
        if key in ("encode", "sample", "evaluate"):
            pool = f"{section.actors} actors" if section.actors else "an autoscaling pool of actors"
            out[stage] = f"{pool} " + (f"x {section.gpus_per_actor:g} GPU" if section.gpus_per_actor else "on CPUs")
        elif getattr(section, "weights", None) is not None:
            out[stage] = "given weights"
        else:
            out[stage] = f"{section.train.workers} workers " + ("x 1 GPU" if section.train.use_gpu else "on CPUs")
    return out


def local_output_problem(recipe: Recipe, node_count: int, address: str, scaling: bool = False) -> str | None:
    """Why a local output_dir cannot work on this cluster, or None when it can: it has several
    nodes, or an autoscaler may add them (a cluster that starts as its head alone grows once work
    is asked for, and every worker it starts writes its own disk)."""
    if not storage.is_local(recipe.output_dir) or recipe.ray.shared_filesystem:
        return None
    if node_count > 1:
        where = f"the cluster at {address} has {node_count} nodes"
    elif scaling:
        where = f"an autoscaler may add nodes to the cluster at {address}"
    else:
        return None
    return (
        f"output_dir {recipe.output_dir} is a local path but {where}, whose workers would each write "
        "their own disk; use shared storage (s3://, gs://) or set ray.shared_filesystem=true for a folder "
        "every node mounts"
    )


def check_recipe_fits(recipe: Recipe, nodes: list[dict[str, Any]], scaling: bool | None, address: str) -> None:
    """Refuses a recipe that cannot run on the cluster as it is (one line each). `scaling` None
    (not known): GPUs it lacks may come (a GPU stage bounds its own wait, `ray.gpu_wait_s`), and a
    local output_dir on one node is let through."""
    problem = local_output_problem(recipe, len(nodes), address, scaling is True)
    if problem:
        raise ClusterError(problem)
    need, field = gpu_demand(recipe)
    have = sum(n["resources_total"].get("GPU", 0.0) for n in nodes)
    if need > have and scaling is False:
        raise ClusterError(
            f"{field} asks for {math.ceil(need)} GPUs but the cluster at {address} has {have:g}; "
            "lower it, or set use_gpu: false / gpus_per_actor: 0 to run on CPUs"
        )
