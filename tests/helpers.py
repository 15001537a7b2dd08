"""Shared helpers: run the real `dalle` CLI, SIGKILL a run with everything it started, and read
a stage's committed output for comparisons."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import storage
from pipeline.data.shards import iter_samples
from pipeline.engine.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
# no test may reach wandb.ai: runs with a W&B project log offline
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}


_PORTS = random.SystemRandom()  # not the global generator, which a test may seed


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (and above Ray's worker ports,
    10002-19999), so no socket bound to port 0 and no outgoing connection (Ray opens hundreds)
    can take it between the moment a test picks it and the moment a run listens on it again,
    as the shared run's synthetic server does half an hour later in test_s3."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = _PORTS.randrange(20000, low) if low > 21000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free loopback port found")


def small_recipe(path: Path, output_dir: Path, **synthetic) -> Path:
    """The demo recipe at test size, written to `path`."""
    data = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    data["output_dir"] = str(output_dir)
    data["ingest"]["synthetic"].update({"count": 160, **synthetic})
    data["ingest"]["shard_size"] = 20
    data["filter"]["shard_size"] = 16
    data["filter"]["dedup_rows_per_task"] = 50  # several groups and buckets in every dedup phase
    data["text_tokenizer"]["vocab_size"] = 600
    path.write_text(yaml.safe_dump(data))
    return path


def dalle(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def kill_run_when(args: list[str], ready, timeout: float = 240, started=None) -> str:
    """Starts `dalle ARGS` in its own session, waits until `ready()` is true, then SIGKILLs every
    process of that session (the driver, Ray's daemons and workers), as a machine crash would.
    The session's processes are listed ahead and `ready` is polled every millisecond, so the kill
    lands within about a millisecond (inside a short window, such as a checkpoint save).
    `started(session_id)` is called once the run is started (for a `ready` that acts on the run's
    own processes meanwhile). Returns what the run printed (stdout and stderr) until the kill; a
    run that ends before the kill point fails the test with the tail of it."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=ROOT,
        env=ENV,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    if started is not None:
        started(proc.pid)
    deadline, listed, pids = time.monotonic() + timeout, 0.0, []
    try:
        while not ready():
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point; it printed:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was never reached")
            if time.monotonic() - listed > 0.5:
                pids, listed = session_pids(proc.pid), time.monotonic()
            time.sleep(0.001)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        kill_session(proc)
        log.seek(0)
        return log.read().decode(errors="replace")
    finally:
        kill_session(proc)
        log.close()


def kill_session(proc: subprocess.Popen, rounds: int = 20) -> None:
    """SIGKILLs every process of `proc`'s session (Ray's daemons and workers included), then reaps it."""
    for _ in range(rounds):
        pids = session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    proc.wait()


def committed(stage_dir: Path) -> list[str]:
    return sorted(Ledger(str(stage_dir)).done())


def sample_digests(stage_dir: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """key → {member: sha256} over the committed tars of a stage, and the keys seen twice."""
    seen: dict[str, dict[str, str]] = {}
    counts: collections.Counter = collections.Counter()
    for record in Ledger(str(stage_dir)).done().values():
        tar = [f for f in record.files if f.endswith(".tar")][0]
        for sample in iter_samples(storage.join(str(stage_dir), tar)):
            key = sample.pop("__key__")
            counts[key] += 1
            seen[key] = {m: hashlib.sha256(v).hexdigest() for m, v in sample.items()}
    return seen, [k for k, n in counts.items() if n > 1]


def compare_stage(got_dir: Path, ref_dir: Path) -> dict[str, int]:
    """Missing, duplicated and differing samples of `got_dir` against the reference run."""
    got, dups = sample_digests(got_dir)
    ref, _ = sample_digests(ref_dir)
    return {
        "missing": len(ref.keys() - got.keys()),
        "extra": len(got.keys() - ref.keys()),
        "duplicate": len(dups),
        "different": sum(1 for k in ref.keys() & got.keys() if got[k] != ref[k]),
        "samples": len(got),
    }


TINY = {
    "dvae": {
        "group_count": 4,  # 8x8 tokens at 64 px (the demo's 16x16 is slower to train on)
        # the paper's loss and schedules (the demo's short-run options are tested on their own)
        "temperature_start": 1.0,
        "temperature_end": 0.0625,
        "kl_weight": 6.6,
        "straight_through": False,
        "usage_weight": 0.0,
        "mse_weight": 0.0,
        "vocab_size": 128,
        "n_hid": 32,
        "n_init": 32,
        "n_blk_per_group": 1,  # one residual block per group and 8 images a rank: 2x faster updates
        "temperature_steps": 40,
        "gumbel_noise_end": 1.0,
        "kl_steps": 50,
        "reconstructions": 8,
        "train": {
            "steps": 60,
            "batch_size": 8,
            "lr": 3e-3,
            "min_lr": 1e-4,
            "checkpoint_every": 30,
            "log_every": 5,
            "ema_decay": 0.9,
        },
    },
    "clip": {
        "image_size": 32,
        "patch_size": 8,
        "vision_width": 32,
        "vision_layers": 1,
        "vision_heads": 2,
        "text_width": 32,
        "text_layers": 1,
        "text_heads": 2,
        "text_len": 16,
        "embed_dim": 16,
        "train": {"steps": 10, "batch_size": 16, "checkpoint_every": 10, "log_every": 5},
    },
    "encode": {"batch_size": 32, "clip_threshold": None},
    "transformer": {
        "preset": "demo",
        "heads": 2,
        "head_dim": 16,
        "holdout": 16,
        "train": {
            "workers": 2,
            "steps": 40,
            "batch_size": 8,
            "lr": 3e-3,
            "min_lr": 1e-4,
            "warmup_steps": 2,
            "zero_stage": 2,
            "checkpoint_every": 10,
            "log_every": 2,
            "keep_checkpoints": 3,
            "max_failures": 2,
            "ema_decay": None,
            "log_sample_keys": True,
        },
    },
    # the generation stages are switched on by the tests that need them (test_report.py)
    "sample": None,
    "evaluate": None,
}


UPSTREAM = ["ingest", "filter", "text-tokenizer", "dvae", "clip", "encode"]
"""The stages before training, which the training tests copy from the shared run."""


def merge_dicts(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        base[key] = merge_dicts(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


def run_until(recipe, until):
    result = dalle("run", str(recipe), "--until", until, "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def copy_stages(src, dst, stages):
    """A run folder holding only `stages` of `src` (what a run had finished before a crash)."""
    for stage in stages:
        shutil.copytree(src / stage, dst / stage)


def recipe_at(tmp_path, run, stages):
    out, recipe = run
    data = yaml.safe_load(recipe.read_text())
    data["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    copy_stages(out, tmp_path / "out", stages)
    return path, tmp_path / "out"


def train_sample_keys(out) -> dict[int, list[list[str]]]:
    """rank -> the keys of every step, in step order, from the rank's checkpoint-interval files."""
    root = out / "train" / "_train" / "sample_keys"
    keys = {}
    for rank_dir in sorted(root.iterdir()):
        steps = []
        for f in sorted(rank_dir.iterdir()):
            steps += json.loads(f.read_text())["keys"]
        keys[int(rank_dir.name.split("_")[1])] = steps
    return keys


def compare_keys(got: dict, ref: dict) -> dict[str, int]:
    """Per (rank, step, key): samples the uninterrupted run trained on that this one did not
    (missing), or trained on more often (duplicate; a batch across an epoch boundary may hold a
    key twice, in both runs alike), and keys the reference never saw (extra)."""
    count = lambda k: collections.Counter(
        (r, i, key) for r, steps in k.items() for i, step in enumerate(steps) for key in step
    )  # noqa: E731
    got_n, ref_n = count(got), count(ref)
    return {
        "missing": sum((ref_n - got_n).values()),
        "duplicate": sum((got_n - ref_n).values()),
        "extra": len({t[2] for t in got_n} - {t[2] for t in ref_n}),
    }


def train_step(progress: Path) -> int:
    """The step in a train stage's `_train/progress.json`; 0 before it is written."""
    try:
        return json.loads(progress.read_text())["step"]
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return 0


def train_update_keys(out) -> dict[int, list[str]]:
    """step -> the sorted keys every rank trained on at that update (whatever the world size of
    each stretch of the run), from the ranks' checkpoint-interval files."""
    updates: dict[int, list[str]] = collections.defaultdict(list)
    for f in sorted((out / "train" / "_train" / "sample_keys").glob("rank_*/*.json")):
        record = json.loads(f.read_text())
        first = record["last_step"] - len(record["keys"]) + 1
        for step, keys in enumerate(record["keys"], start=first):
            updates[step] += keys
    return {step: sorted(keys) for step, keys in sorted(updates.items())}
