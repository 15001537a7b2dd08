"""Training checkpoints (reported to Ray Train, or copied in place by `TorchSession`): every rank
saves its DeepSpeed files and its EMA shard into one checkpoint folder (`checkpoint_<step>`), with
a list of the files it wrote; rank 0 adds
the trainer state (step, data position, W&B run id, world size) and the task (to rebuild the
model for `dalle export`).

    checkpoint_00000040/
      deepspeed/            DeepSpeed's files (model and optimizer partitions of every rank)
      ema/rank_00001.pt     rank 1's EMA shard (when the run keeps an EMA)
      ranks/rank_00001.json the files rank 1 wrote, with their sizes
      trainer_state.json    {"step", "world", "run_id", "samples_per_rank"}
      task.json             {"task": "module:Class", "config": {...}}

Ray Train registers a checkpoint once every rank has reported it and keeps the last K. After a
restart (`FailureConfig`, or a rerun of the stage) the workers resume from the newest complete
checkpoint in the run folder (every rank's listed files present at their size); an incomplete
one is skipped, with a warning, for the newest complete one before it. Rank 0 alone finds it
(one listing); each rank then fetches only its own partitions and the shared files (at 12B on
512 ranks: ~0.4 GB each, not the whole ~200 GB checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from pipeline import storage
from pipeline.errors import CheckpointMismatch
from pipeline.train.ema import reshard as reshard_ema
from pipeline.train.reshard import save_shapes
from pipeline.train.weights import DEEPSPEED_TAG

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
TASK = "task.json"
PREFIX = "checkpoint_"


def _files_under(folder: str) -> dict[str, int]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return out


SCRATCH = "dalle-ckpt-"
"""Prefix of a rank's local staging folder for one save (`dalle-ckpt-<pid>-<random>`)."""


def _sweep_orphans() -> None:
    """Removes the staging folders of ranks that died mid-save (SIGKILL, OOM): their pid is gone.
    A 12B save stages GBs per rank, and nothing else would ever delete them."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(SCRATCH) :].split("-", 1)[0] if name.startswith(SCRATCH) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def save(
    engine, ema, state: dict[str, Any], task: dict[str, Any], metrics: dict[str, float], rank: int, session
) -> None:
    """Saves on every rank (collective), then hands the checkpoint to the `session` (Ray Train's
    report, or the run folder directly)."""
    _sweep_orphans()
    folder = tempfile.mkdtemp(prefix=f"{SCRATCH}{os.getpid()}-")
    try:
        engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        if rank == 0 and engine.zero_optimization_stage() >= 1:
            save_shapes(engine, folder)  # what a conversion for another world size reads
        if ema is not None:
            os.makedirs(os.path.join(folder, "ema"))
            torch.save(ema.state_dict(), os.path.join(folder, "ema", f"rank_{rank:05d}.pt"))
        if rank == 0:
            for name, obj in ((STATE, state), (TASK, task)):
                with open(os.path.join(folder, name), "w") as f:
                    json.dump(obj, f)
        files = _files_under(folder)
        os.makedirs(os.path.join(folder, "ranks"))
        with open(os.path.join(folder, "ranks", f"rank_{rank:05d}.json"), "w") as f:
            json.dump(files, f)
        session.report(metrics, folder, f"{PREFIX}{state['step']:08d}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def problem(url: str) -> str | None:
    """Why the checkpoint folder at `url` (local path or fsspec URL) cannot be resumed, or None.
    One listing of the folder and one batched read of the ranks' file lists, whatever the world."""
    state = storage.read_json_or_none(storage.join(url, STATE))
    if state is None:
        return f"no {STATE}"
    present = storage.file_sizes(url)
    lists = storage.read_many([storage.join(url, _rank_list(r)) for r in range(state["world"])])
    for rank in range(state["world"]):
        data = lists.get(storage.join(url, _rank_list(rank)))
        if data is None:
            return f"rank {rank} left no file list"
        for rel, size in sorted(json.loads(data).items()):
            if rel not in present:
                return f"rank {rank}'s {rel} is missing"
            if present[rel] != size:
                return f"rank {rank}'s {rel} has {present[rel]} bytes, it wrote {size}"
    return None


def _rank_list(rank: int) -> str:
    return f"ranks/rank_{rank:05d}.json"


# Files one rank writes for itself: DeepSpeed's ZeRO partitions and our EMA shards and file lists.
_RANK_FILE = re.compile(r"(zero_pp_rank_\d+_|rank_\d{5}\.)")


def rank_files(url: str, rank: int) -> list[str]:
    """What rank `rank` reads to resume from the checkpoint at `url` (same world size): the files it
    wrote itself (its ZeRO partitions, its EMA shard) and the shared ones rank 0 wrote (trainer
    state, task, ZeRO 0-2's module file); never another rank's partitions."""
    own = json.loads(storage.read_bytes(storage.join(url, _rank_list(rank))))
    first = own if rank == 0 else json.loads(storage.read_bytes(storage.join(url, _rank_list(0))))
    return sorted(set(own) | {f for f in first if not _RANK_FILE.search(f)})


def checkpoints(run_url: str) -> list[str]:
    """Checkpoint folder names under a Ray Train run folder, newest first."""
    fs, path = storage.get_fs(run_url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = [os.path.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"]
    return sorted((n for n in names if n.startswith(PREFIX) and n[len(PREFIX) :].isdigit()), reverse=True)


def latest_complete(run_url: str) -> str | None:
    """The URL of the newest complete checkpoint of a run, warning about each incomplete one
    passed over."""
    for name in checkpoints(run_url):
        url = storage.join(run_url, name)
        reason = problem(url)
        if reason is None:
            return url
        log.warning("skipping incomplete checkpoint %s: %s", url, reason)
    return None


def resumable(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint of a run and its trainer state, or None (on the driver)."""
    url = latest_complete(run_url)
    return None if url is None else (url, trainer_state(url))


def newest(run_url: str) -> str | None:
    """The newest complete checkpoint of the run at `run_url`, or None: found by rank 0 alone (one
    listing) and told to the others. Collective.

    The run folder is scanned rather than trusting only `ray.train.get_checkpoint()`: Ray Train
    registers a checkpoint when its controller next polls the workers, so a crash shortly after
    a report can leave a complete checkpoint on storage that Ray never registered, and resuming
    from Ray's older one would redo (and re-log) those steps."""
    from pipeline.train.collectives import broadcast_object, rank

    return broadcast_object(latest_complete(run_url) if rank() == 0 else None)


def trainer_state(url: str) -> dict[str, Any]:
    """The trainer state of the checkpoint at `url`, with the batch layout of runs that predate it."""
    state = storage.read_json(storage.join(url, STATE))
    state.setdefault("lanes", state["world"])
    state.setdefault("per_lane", 1)
    return state


def load(engine, ema, url: str, state: dict[str, Any], rank: int, world: int) -> None:
    """Restores the checkpoint at `url` (with trainer `state`) into `engine` and `ema`. On the
    world that wrote it each rank fetches only `rank_files`; on another, ZeRO 1-3 states come from
    the converted checkpoint, each rank fetching only its own partitions' bytes
    (`pipeline.train.reshard`), and ZeRO-0 states, whole on every rank, from rank 0's files with
    every EMA shard to re-cut its own."""
    from pipeline.train import reshard

    if state["world"] != world and reshard.needs_conversion(engine.zero_optimization_stage()):
        if not reshard.converted(url):
            raise CheckpointMismatch(f"{url}: written by {state['world']} workers and not converted for {world}")
        fetched = reshard.load(engine, ema, url, rank, world)
        log.info(
            "rank %d resumed from %s at step %d (written by %d workers, re-cut for %d), fetching %.1f MB",
            rank, url, state["step"], state["world"], world, fetched / 1e6,
        )  # fmt: skip
        return
    same_world = state["world"] == world
    files = rank_files(url, rank if same_world else 0)
    if not same_world:
        files = [f for f in files if not f.startswith("ema/")] + _ema_files(url)
    with storage.local_copy(url, files) as folder:  # DeepSpeed reads local files only
        load_path, _ = engine.load_checkpoint(folder, tag=DEEPSPEED_TAG, load_module_strict=True)
        if load_path is None:
            raise CheckpointMismatch(f"{url}: DeepSpeed found no '{DEEPSPEED_TAG}' checkpoint in it")
        if ema is not None:
            if same_world:
                path = os.path.join(folder, "ema", f"rank_{ema.rank:05d}.pt")
                ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                paths = [os.path.join(folder, f) for f in files if f.startswith("ema/")]
                saved = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in paths]
                ema.load_state_dict(reshard_ema(saved, rank, world))
    how = "" if same_world else f" (written by {state['world']} workers, re-cut for {world})"
    log.info("rank %d resumed from %s at step %d%s, reading %d files", rank, url, state["step"], how, len(files))


def _ema_files(url: str) -> list[str]:
    return [f"ema/{n}" for n in storage.list_names(storage.join(url, "ema"), ".pt")]
