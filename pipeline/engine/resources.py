"""GPU asks. Whether a stage runs on GPUs is the recipe's decision (`encode.gpus_per_actor`,
`sample.gpus_per_actor`, `<model>.train.use_gpu`), never what the cluster has when the stage
starts: an autoscaling cluster (every file in `cluster/`) starts its GPU groups at zero, and only
an ask it sees makes it start GPU nodes. So a stage that asks for GPUs asks, and before it hands
Ray its actors or training workers, `await_gpus` makes sure the ask can be met:

- the nodes alive can hold it now: go;
- this process started its own Ray (`dalle run` without an address) and its nodes can never hold
  it: refuse at once, in one line (no autoscaler can ever add a node to such a Ray);
- else (a cluster): submit the ask as a placement group of the same bundles (what the autoscaler
  scales up for, and what Ray Train and the actor pool then ask for themselves) and wait for it up
  to `ray.gpu_wait_s`; refuse in one line when it does not come. The probe is removed either way.

`dalle run` also checks every stage it is about to run with `refuse_impossible` before the first
one starts, so a GPU recipe on a machine without GPUs stops before ingest, not hours later.

What Ray 2.60 lets a driver know about a cluster's future GPUs, and what it does not:
- `ray.nodes()` gives the nodes alive, not those an autoscaler could add.
- The node types an autoscaler may launch are not readable from the driver of a `ray up` or KubeRay
  cluster: `ray._private.state.state.get_max_resources_from_cluster_config()` reads a config that
  only a platform reporting it to the GCS (`ReportClusterConfig`; nothing in open-source Ray does)
  writes, and is None elsewhere. Ray Train's own check uses it and is skipped when it is None.
- An ask no node type can hold is reported by the autoscaler (v1 logs "No available node types can
  fulfill resource request", v2 lists it as infeasible in `GetClusterStatus`), not to the driver as
  an error: Ray keeps it pending forever. Hence the deadline, whose message names both causes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import ClusterError

log = logging.getLogger(__name__)

Bundle = dict[str, float]


@dataclass(frozen=True)
class GpuAsk:
    """The GPUs a stage asks for, from its recipe alone: `bundles` to be held at once."""

    asked_by: str
    """The recipe field that asks, as `dalle` shows it: `encode.gpus_per_actor=1`."""
    cpu_hint: str
    """The override that runs the stage on CPUs instead: `encode.gpus_per_actor=0`."""
    bundles: tuple[Bundle, ...]
    strategy: str = "PACK"

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0.0) for b in self.bundles)


def pool_ask(section: str, cpus: float, gpus_per_actor: float | None) -> GpuAsk | None:
    """What a pool of `gpus_per_actor`-GPU actors must get before it starts: one actor's resources
    (Ray Data adds the others as they fit, and the pool's pending actors keep asking the autoscaler
    for the rest); None for a pool on CPUs."""
    if not gpus_per_actor:
        return None
    field = f"{section}.gpus_per_actor"
    return GpuAsk(f"{field}={gpus_per_actor:g}", f"{field}=0", ({"CPU": cpus, "GPU": gpus_per_actor},))


def train_ask(section: str, workers: int, cpus_per_worker: float, use_gpu: bool | None) -> GpuAsk | None:
    """What Ray Train asks for a GPU run: every worker's bundle at once (one placement group,
    PACK, as `ScalingConfig` does); None for a run on CPUs."""
    if not use_gpu:
        return None
    field = f"{section}.train.use_gpu"
    bundles = ({"CPU": cpus_per_worker, "GPU": 1.0},) * workers
    return GpuAsk(f"{field} with {workers} workers", f"{field}=false", bundles)


def capacity_problem(bundles: Sequence[Bundle], nodes: Sequence[dict[str, float]]) -> str | None:
    """Why nodes with these total resources could never hold all of `bundles` at once (one line),
    or None when they could. Bundles are placed first-fit, largest GPU ask first: exact for the
    equal bundles the stages ask for."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: -b.get("GPU", 0.0)):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in bundle.items())), None)
        if node is None:
            gpus = sum(n.get("GPU", 0.0) for n in nodes)
            most = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            return (
                f"{len(bundles)} x {_shown(bundle)} do not fit its {len(nodes)} node(s) "
                f"({gpus:g} GPUs in all, at most {most:g} on one)"
            )
        for k, v in bundle.items():
            node[k] -= v
    return None


def _shown(bundle: Bundle) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def own_ray() -> bool:
    """Whether this process started the Ray it is attached to (`ray.init(address="local")`): no
    autoscaler manages such a Ray. Read from Ray's private driver state; where that is missing
    (another Ray release) the answer is False, and a GPU ask then waits out `ray.gpu_wait_s`
    instead of being refused at once."""
    try:
        import ray._private.worker

        return bool(getattr(ray._private.worker.global_worker.node, "head", False))
    except Exception:  # noqa: BLE001 - private API; see the docstring
        return False


def _node_totals() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n["Alive"]]


def refuse_impossible(label: str, ask: GpuAsk) -> None:
    """Raises ClusterError (one line) when this process started its own Ray and its nodes can
    never hold `ask`; on a cluster, and when they can, returns (`await_gpus` then waits)."""
    if not own_ray():
        return
    problem = capacity_problem(ask.bundles, _node_totals())
    if problem:
        raise ClusterError(
            f"stage '{label}': {ask.asked_by} asks for GPUs, but on this machine's Ray (no autoscaler) "
            f"{problem}; run it on a machine or cluster with GPUs, or set {ask.cpu_hint} to run on CPUs"
        )


def await_gpus(label: str, ask: GpuAsk, wait_s: float | None) -> None:
    """Returns once the cluster holds every bundle of `ask` at once; raises ClusterError (one
    line) when this Ray can never hold them (`refuse_impossible`), or when they did not come
    within `wait_s` seconds (None: no limit). Meanwhile the ask stands as a placement group, which
    is what an autoscaler starts nodes for; it is removed before the stage asks for itself."""
    from ray.util.placement_group import placement_group, remove_placement_group

    refuse_impossible(label, ask)
    problem = capacity_problem(ask.bundles, _node_totals())
    if problem:
        limit = "without a limit" if wait_s is None else f"up to {wait_s:g} s"
        log.warning("%s: %s; waiting %s for the cluster's autoscaler to add GPU nodes", label, problem, limit)
    group = placement_group(list(ask.bundles), strategy=ask.strategy, name=f"dalle-{label}-gpu-probe")
    started = time.monotonic()
    try:
        # in slices, so that Ctrl-C reaches the driver between them
        while not group.wait(timeout_seconds=_slice(wait_s, started)):
            if wait_s is not None and time.monotonic() - started >= wait_s:
                have = sum(n.get("GPU", 0.0) for n in _node_totals())
                raise ClusterError(
                    f"stage '{label}': {ask.asked_by} asks for {ask.gpus:g} GPUs and they did not come within "
                    f"{wait_s:g} s (the cluster has {have:g}); it has no GPU node type or its autoscaler "
                    f"cannot start one (`ray status` on the head says which): add one, raise ray.gpu_wait_s, "
                    f"or set {ask.cpu_hint} to run on CPUs"
                )
    finally:
        remove_placement_group(group)
    waited = time.monotonic() - started
    if waited > 1.0:
        log.warning("%s: the GPUs came after %.0f s", label, waited)


def _slice(wait_s: float | None, started: float) -> float:
    left = math.inf if wait_s is None else wait_s - (time.monotonic() - started)
    return max(0.1, min(10.0, left))


def note_unused_gpus(label: str, field: str) -> None:
    """Logs one line when a stage that runs models runs them on CPUs, as its recipe asks (`field`
    unset or 0), on a cluster that has GPUs now. A hint, not a decision: the GPUs alive at this
    moment decide nothing (a recipe written when null meant "GPUs when the cluster has them" reads
    as CPUs now, and this line says so)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus:
        log.warning("%s: runs on CPUs, as %s (unset or 0) asks, though the cluster has %g GPUs", label, field, gpus)
