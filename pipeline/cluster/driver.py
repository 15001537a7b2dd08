"""The driver's connection to Ray: a Ray of its own on this machine, or the cluster at an address."""

from __future__ import annotations

import logging
import os
import sys

import ray

from pipeline.cluster.client import local_output_problem
from pipeline.config.recipe import Recipe
from pipeline.data.fetch_policy import OPENCV_ENV
from pipeline.errors import InputError

log = logging.getLogger(__name__)

# Environment of every Ray worker: img2dataset imports albumentations, whose import-time update
# check would reach for the network; OpenCV reads its pixel cap once, when it loads.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", **OPENCV_ENV}
# On a Ray of this process's own, Ray Train's controller polls its workers every 0.5 s instead of
# 2 (a machine's few workers): a training's end, or a lost worker, is seen up to 3 s sooner.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}


def init_ray(recipe: Recipe, address: str | None, worker_logs: bool = False) -> None:
    """Connects to `address` (or the recipe's) and says so on stderr, else starts a Ray of this
    process's own (`address="local"`): a plain `ray.init()` would attach to whatever cluster
    `/tmp/ray` names, a head the user started or a stale one left by a crash.

    Worker output is not echoed unless `worker_logs`: task failures reach the user as one line
    each from the executor, and the full logs stay in Ray's session folder."""
    if ray.is_initialized():
        return
    # The executor gets every task's result it waits for and reports each failure in one line;
    # results left unread are those of a run already stopping (a full disk, Ctrl-C), and Ray would
    # print each one's traceback as an "unhandled error" on the way out
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    address = address or recipe.ray.address
    env = WORKER_ENV if address else {**LOCAL_ENV, **WORKER_ENV}
    common = dict(logging_level=logging.WARNING, log_to_driver=worker_logs, runtime_env={"env_vars": env})
    if not address:
        # Ray 2.60 warns on every local start that it turned token authentication on; it is on,
        # and the warning is noise in every `dalle run`
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=recipe.ray.num_cpus, include_dashboard=False, **common)
        log.info("started a Ray of this process's own (%s CPUs)", recipe.ray.num_cpus or "all")
        return
    ray.init(address=address, **common)
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    problem = local_output_problem(recipe, nodes, address)
    if problem:
        ray.shutdown()
        raise InputError(problem)
    print(f"dalle: attached to the Ray cluster at {address} ({nodes} nodes)", file=sys.stderr)
