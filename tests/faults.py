"""The fault matrix: each scenario breaks what a real run meets (a full disk, an object store that
dies, a SIGKILL during a checkpoint save, damaged encoded shards fed to training, a hostile or
changed URL list, a running or stale local Ray, secrets in the environment),
shows what the user saw, removes the cause and runs again. Per scenario it reports the samples
lost, duplicated and half-written against an uninterrupted run.

    python tests/faults.py [--only NAME ...] [--work DIR]     (`make faults`: the table as JSON)

`tests/test_faults.py` runs every scenario and asserts on its row. Nothing here connects to an
address other than 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402
    ENV,
    ROOT,
    TINY,
    UPSTREAM,
    compare_keys,
    compare_stage,
    free_port,
    kill_run_when,
    kill_session,
    merge_dicts,
    recipe_at,
    small_recipe,
    train_sample_keys,
    train_step,
)

from pipeline.commands.validate import validate  # noqa: E402


@dataclass
class Row:
    scenario: str
    message: str = ""
    """What the user saw: the broken run's last line on stderr (its summary line when it succeeded)."""
    exit_code: int | None = None
    traceback: bool = False
    """A traceback reached the user's terminal."""
    lost: int = 0
    duplicated: int = 0
    different: int = 0
    half_written: int = 0
    """Committed shards that fail `dalle validate`, after the fault and after the rerun."""
    rerun_exit_code: int | None = None
    samples: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    skipped: str | None = None


def dalle(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=ROOT)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def half_written(stage_dir: str | Path) -> int:
    """Problems `dalle validate` finds in the committed shards (0 when nothing was committed)."""
    try:
        report = validate(str(stage_dir))
    except Exception:  # noqa: BLE001 - no stage folder yet: nothing half-written either
        return 0
    return sum(len(p) for p in report.problems.values())


def broken(row: Row, result: subprocess.CompletedProcess) -> None:
    row.exit_code, row.traceback = result.returncode, "Traceback" in result.stderr + result.stdout
    row.message = last_line(result.stderr) if result.returncode else last_line(result.stdout)


def compared(row: Row, got: str | Path, ref: str | Path) -> None:
    same = compare_stage(got, ref)
    row.lost, row.duplicated, row.different, row.samples = (
        same["missing"],
        same["duplicate"],
        same["different"],
        same["samples"],
    )
    row.half_written += half_written(got)


class Reference:
    """The uninterrupted runs the scenarios are compared with, each made once when first asked
    for: the small recipe's ingest on a fixed port (every ingest scenario runs the same recipe, so
    the same URLs, into its own folder), its run through encode at test size, and its training.
    The tests hand in the encoded and trained runs their other modules share."""

    def __init__(self, work: Path, encoded: tuple[Path, Path] | None = None, trained: Path | None = None):
        self.work = work
        self.port = free_port()
        self._encoded, self._trained = encoded, trained

    def use(self, encoded: tuple[Path, Path], trained: Path) -> None:
        """Takes runs made elsewhere (the tests' shared fixtures) as the references."""
        self._encoded, self._trained = encoded, trained

    @property
    def encoded(self) -> tuple[Path, Path]:
        """(output dir, recipe) of the test-size run through encode."""
        if self._encoded is None:
            folder = self.work / "encoded"
            folder.mkdir(parents=True, exist_ok=True)
            recipe = small_recipe(folder / "recipe.yaml", folder / "out", port=free_port())
            recipe.write_text(yaml.safe_dump(merge_dicts(yaml.safe_load(recipe.read_text()), TINY)))
            _must(dalle("run", recipe, "--until", "encode", "--no-progress"), "the reference run through encode")
            self._encoded = (folder / "out", recipe)
        return self._encoded

    @property
    def trained(self) -> Path:
        """The output dir of an uninterrupted training on the encoded run."""
        if self._trained is None:
            (self.work / "trained").mkdir(parents=True, exist_ok=True)
            recipe, out = recipe_at(self.work / "trained", self.encoded, UPSTREAM)
            _must(dalle("run", recipe, "--until", "train", "--no-progress"), "the reference training")
            self._trained = out
        return self._trained

    def recipe(self, path: Path, **top) -> Path:
        """The small recipe at `path` with `top` (e.g. output_dir) replaced."""
        small_recipe(path, self.work / "unused", port=self.port, count=100)
        data = {**yaml.safe_load(path.read_text()), **{k: str(v) for k, v in top.items()}}
        path.write_text(yaml.safe_dump(data))
        return path

    @property
    def ingest(self) -> Path:
        out = self.work / "reference" / "out"
        if not (out / "ingest" / "_done.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            recipe = self.recipe(self.work / "reference" / "recipe.yaml", output_dir=out)
            _must(dalle("run", recipe, "--until", "ingest", "--no-progress"), "the reference ingest")
        return out / "ingest"


def _must(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode:
        raise RuntimeError(f"{what} failed: {result.stderr[-2000:]}")


def _losses(out: Path) -> dict[int, float]:
    from pipeline.observe.tracking import read_metrics

    return {m["step"]: m["loss"] for m in read_metrics(str(out / "train" / "metrics.jsonl")) if "loss" in m}


def _same_training(row: Row, out: Path, ref: Path) -> None:
    """Samples lost and duplicated against the reference training, per (rank, step); losses that
    differ by more than rel 1e-4 count as different."""
    keys = compare_keys(train_sample_keys(out), train_sample_keys(ref))
    row.lost += keys["missing"]
    row.duplicated += keys["duplicate"]
    got, want = _losses(out), _losses(ref)
    row.different += sum(abs(got.get(step, float("inf")) - loss) > 1e-4 * abs(loss) for step, loss in want.items())
    row.samples += sum(len(step) for steps in train_sample_keys(out).values() for step in steps)


def checkpoint_sigkill(work: Path, ref: Reference) -> Row:
    """Every process of a training run is SIGKILLed the moment its second checkpoint's folder
    appears (the save under way); the same command then runs again."""
    from pipeline.train import checkpoint

    row = Row("checkpoint_sigkill")
    reference = ref.trained
    recipe, out = recipe_at(work, ref.encoded, UPSTREAM)
    newest = out / "train" / "_train" / "run" / "checkpoint_00000020"
    kill_run_when(["run", str(recipe), "--until", "train", "--no-progress"], newest.exists, timeout=400)
    row.extra["newest_half_written"] = checkpoint.problem(str(newest)) is not None
    row.extra["step_at_kill"] = train_step(out / "train" / "_train" / "progress.json")
    rerun = dalle("run", recipe, "--until", "train", "--no-progress")
    broken(row, rerun)
    row.rerun_exit_code = rerun.returncode
    notice = [ln for ln in rerun.stderr.splitlines() if "checkpoint_00000020" in ln]
    row.message = notice[0] if notice else row.message  # what the rerun told the user
    kept = checkpoint.checkpoints(str(newest.parent))
    row.half_written = sum(checkpoint.problem(str(newest.parent / name)) is not None for name in kept)
    _same_training(row, out, reference)
    return row


def _damage(encode: Path) -> dict[str, str]:
    """Truncates the first tar to half its size and overwrites the header of the middle member of
    the third with random bytes (bit rot); returns what was done to which shard."""
    import random
    import tarfile

    tars = sorted(encode.glob("*.tar"))
    first, third = tars[0], tars[2]
    os.truncate(first, first.stat().st_size // 2)
    with tarfile.open(third) as tar:
        members = tar.getmembers()
    offset = members[len(members) // 2].offset
    data = bytearray(third.read_bytes())
    data[offset : offset + 512] = random.Random(0).randbytes(512)
    third.write_bytes(bytes(data))
    return {first.stem: "truncated", third.stem: "corrupted"}


def damaged_encoded_shards(work: Path, ref: Reference) -> Row:
    """A truncated and a corrupted encoded shard fed to training, which ends at once (no restart
    into the same bytes); `dalle validate --drop-damaged` takes them out of the ledger and the
    rerun encodes them again, then trains."""
    row = Row("damaged_encoded_shards")
    reference = ref.trained
    recipe, out = recipe_at(work, ref.encoded, UPSTREAM)
    row.extra["damaged"] = _damage(out / "encode")
    broken(row, dalle("run", recipe, "--until", "train", "--no-progress"))
    # each start of the workers (Ray Train's restarts included) begins a W&B run: it started once
    row.extra["attempts"] = len(list((out / "train" / "wandb").glob("offline-run-*")))
    drop = dalle("validate", out / "encode", "--drop-damaged")
    row.extra["validate"] = last_line(drop.stdout)
    row.extra["validate_exit_code"] = drop.returncode
    row.rerun_exit_code = dalle("run", recipe, "--until", "train", "--no-progress").returncode
    compared(row, out / "encode", ref.encoded[0] / "encode")
    _same_training(row, out, reference)
    return row


def disk_full(work: Path, ref: Reference) -> Row:
    """A 1 MB tmpfs as output_dir fills during ingest's commits; then it grows to 64 MB and the
    same command runs again."""
    row = Row("disk_full")
    mount = work / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        row.skipped = f"cannot mount a tmpfs here: {made.stderr.decode().strip()}"
        return row
    try:
        recipe = ref.recipe(work / "recipe.yaml", output_dir=mount / "out")
        broken(row, dalle("run", recipe, "--until", "ingest", "--no-progress"))
        row.half_written = half_written(mount / "out" / "ingest")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        row.rerun_exit_code = dalle("run", recipe, "--until", "ingest", "--no-progress").returncode
        compared(row, mount / "out" / "ingest", ref.ingest)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    return row


def object_store_killed(work: Path, ref: Reference) -> Row:
    """moto (S3) stops answering once ingest has committed its first shard; it is started again
    on the same port (empty: moto keeps nothing) and the same command runs again."""
    import boto3
    import s3fs

    from pipeline.synthetic.s3_server import CLEARED, client_env, start_s3_server

    row = Row("object_store_killed")
    committed = threading.Event()

    def on_request(method: str, path: str) -> None:
        if method == "PUT" and "/ingest/_ledger/" in path and not committed.is_set():
            committed.set()
            threading.Thread(target=server.stop, daemon=True).start()

    server = start_s3_server(on_request)
    port = server.get_host_and_port()[1]
    # botocore's retries of a dead endpoint cut to 2, so the scenario ends sooner
    env = {k: v for k, v in ENV.items() if k not in CLEARED} | client_env(server) | {"AWS_MAX_ATTEMPTS": "2"}
    saved = {k: os.environ.get(k) for k in env if k.startswith("AWS_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        boto3.client("s3").create_bucket(Bucket="faults")
        recipe = ref.recipe(work / "recipe.yaml", output_dir="s3://faults/run")
        started = time.monotonic()
        broken(row, dalle("run", recipe, "--until", "ingest", "--no-progress", env=env))
        row.extra["seconds_to_fail"] = round(time.monotonic() - started, 1)
        row.extra["killed_after_first_commit"] = committed.is_set()
        server = start_s3_server(port=port)
        s3fs.S3FileSystem.clear_instance_cache()
        boto3.client("s3").create_bucket(Bucket="faults")
        row.rerun_exit_code = dalle("run", recipe, "--until", "ingest", "--no-progress", env=env).returncode
        s3fs.S3FileSystem.clear_instance_cache()
        compared(row, "s3://faults/run/ingest", ref.ingest)
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        s3fs.S3FileSystem.clear_instance_cache()
    return row


def _url_list_recipe(work: Path, lists: list[Path], **ingest) -> Path:
    data = {
        "name": "faults",
        "output_dir": str(work / "out"),
        "ray": {"num_cpus": 2},
        "ingest": {"url_lists": [str(p) for p in lists], "image_size": 64, "shard_size": 10, **ingest},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def url_list_changed(work: Path, ref: Reference) -> Row:
    """A URL list loses a row between two runs; then it is put back and the run resumes."""
    from pipeline.config.data import SyntheticConfig
    from pipeline.synthetic.dataset import generate, url_list_rows
    from pipeline.synthetic.server import LoopbackServer, dead_url

    row = Row("url_list_changed")
    dataset = generate(SyntheticConfig(count=40, seed=5))
    with LoopbackServer(dataset.files) as server:
        rows = [{"url": r["url"], "caption": r["caption"]} for r in url_list_rows(dataset, server.url, dead_url())]
        listed = work / "list.csv"
        pacsv.write_csv(pa.Table.from_pylist(rows), listed)
        recipe = _url_list_recipe(work, [listed], allow_networks=["127.0.0.0/8"])
        first = dalle("run", recipe, "--until", "ingest", "--no-progress")
        if first.returncode:
            raise RuntimeError(f"the first run failed: {first.stderr[-2000:]}")
        shutil.copytree(work / "out" / "ingest", work / "uninterrupted")
        pacsv.write_csv(pa.Table.from_pylist(rows[:-1]), listed)
        broken(row, dalle("run", recipe, "--until", "ingest", "--no-progress"))
        pacsv.write_csv(pa.Table.from_pylist(rows), listed)
        row.rerun_exit_code = dalle("run", recipe, "--until", "ingest", "--no-progress").returncode
    compared(row, work / "out" / "ingest", work / "uninterrupted")
    return row


def hostile_url_list(work: Path, ref: Reference) -> Row:
    """Local files, other schemes, decompression bombs, redirects to refused addresses, HTML pages,
    404s, oversized bodies, a host slower than the timeout and hosts dripping past the deadline,
    among good images, in one list."""
    from pipeline.config.data import SyntheticConfig
    from pipeline.stages.ingest import FAILURES
    from pipeline.synthetic.dataset import generate
    from pipeline.synthetic.hostile import hostile_rows
    from pipeline.synthetic.server import LoopbackServer

    row = Row("hostile_url_list")
    secret = work / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for the dataset")
    dataset = generate(SyntheticConfig(count=30, seed=6, defect_fraction=0.0))
    timeout_s, max_bytes, deadline_s = 1.0, 300_000, 2.0
    extra, hostile = hostile_rows(str(secret), max_bytes, timeout_s, deadline_s)
    with LoopbackServer({**dataset.files, **extra}) as server:
        good = [{"url": server.url + r["path"], "caption": r["caption"], "expect": "success"} for r in dataset.rows]
        bad = [
            {
                "url": r.path_or_url if ":" in r.path_or_url.split("/")[0] else server.url + r.path_or_url,
                "caption": f"hostile row {i}",
                "expect": r.expect,
            }
            for i, r in enumerate(hostile)
        ]
        rows = [x for pair in zip(bad, good) for x in pair] + good[len(bad) :]  # bombs in every shard
        listed = work / "list.parquet"
        pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"]} for r in rows]), listed)
        recipe = _url_list_recipe(
            work,
            [listed],
            allow_networks=["127.0.0.1/32"],
            timeout_s=timeout_s,
            download_deadline_s=deadline_s,
            max_bytes=max_bytes,
            threads=8,
        )
        broken(row, dalle("run", recipe, "--until", "ingest", "--no-progress"))
        row.rerun_exit_code = dalle("run", recipe, "--until", "ingest", "--no-progress").returncode
        fetched = list(server.served)
    done = json.loads((work / "out" / "ingest" / "_done.json").read_text())
    want = {reason: sum(r["expect"] == reason for r in rows) for reason in FAILURES}
    row.extra = {
        "counts": {k: v for k, v in done["counts"].items() if v},
        "expected": {k: v for k, v in want.items() if v},
        "rows": len(rows),
        "good": len(good),
        "server_saw_secret": any(secret.name in p for p in fetched),
    }
    manifests = [m for p in sorted((work / "out" / "ingest").glob("*.parquet")) for m in pq.read_table(p).to_pylist()]
    kept = {m["url"] for m in manifests if m["status"] == "success"}
    row.lost = sum(r["url"] not in kept for r in good)
    row.samples = done["samples_out"]
    row.duplicated = len(manifests) - len({m["key"] for m in manifests})
    row.half_written = half_written(work / "out" / "ingest")
    return row


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Head:
    """`ray start --head` on Ray's default temp dir (/tmp/ray), as a user starts one."""

    def __init__(self, work: Path):
        token = work / "auth_token"
        token.write_text(secrets.token_hex(16))
        env = {k: v for k, v in ENV.items() if k != "RAY_ADDRESS"}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = env
        ports = [
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats"]
        cmd += [*ports, "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=1"]
        self.log = open(work / "ray-head.log", "w")  # noqa: SIM115 - lives as long as the head
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log, start_new_session=True)
        self.address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited; see {self.log.name}")
            # what `ray start` prints once its node is up (not Ray's address file, which the local
            # Ray of another test's run may write meanwhile)
            if "Ray runtime started" in Path(self.log.name).read_text() and _listening(self.dashboard_port):
                return  # the node, and its dashboard, which comes up after it
            time.sleep(0.5)
        raise RuntimeError(f"the Ray head did not come up; see {self.log.name}")

    def kill(self) -> None:
        kill_session(self.proc, rounds=50)
        self.log.close()


def ray_head_running_then_stale(work: Path, ref: Reference) -> Row:
    """`dalle run` while a `ray start --head` runs on the machine, then after it was SIGKILLed
    (its /tmp/ray files left stale): both start a Ray of their own. With `--address` the run
    attaches to the head instead, and says so."""
    row = Row("ray_head_running_then_stale")
    head = _Head(work)
    try:
        head.wait_up()
        running = dalle("run", ref.recipe(work / "a.yaml", output_dir=work / "a"), "--until", "ingest", "--no-progress")
        address = f"127.0.0.1:{head.gcs_port}"
        recipe = ref.recipe(work / "c.yaml", output_dir=work / "c")
        attached = dalle("run", recipe, "--until", "ingest", "--no-progress", "--address", address, env=head.env)
    finally:
        head.kill()
    stale = dalle("run", ref.recipe(work / "b.yaml", output_dir=work / "b"), "--until", "ingest", "--no-progress")
    broken(row, running if running.returncode else stale)
    row.rerun_exit_code = stale.returncode
    row.extra = {
        "running_head_exit_code": running.returncode,
        "attached": "attached" in running.stderr + stale.stderr,
        "with_address": {
            "exit_code": attached.returncode,
            "message": next((ln for ln in attached.stderr.splitlines() if ln.startswith("dalle: ")), ""),
            "traceback": "Traceback" in attached.stderr,
        },
    }
    compared(row, work / "a" / "ingest", ref.ingest)
    second = compare_stage(work / "b" / "ingest", ref.ingest)
    row.lost += second["missing"]
    row.duplicated += second["duplicate"]
    row.different += second["different"]
    row.half_written += half_written(work / "b" / "ingest")
    return row


SECRETS = ("AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "RAY_AUTH_TOKEN")


def files_holding(root: Path, markers: list[bytes]) -> list[str]:
    """Every file under `root` whose bytes hold one of `markers`."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(m in data for m in markers):
                found.append(str(path))
    return found


def secrets_in_files(work: Path, ref: Reference) -> Row:
    """A run with AWS_SECRET_ACCESS_KEY, WANDB_API_KEY and RAY_AUTH_TOKEN set to marker values,
    W&B on (offline): no file it wrote, and no log of its Ray session, holds a marker."""
    row = Row("secrets_in_files")
    markers = {name: f"marker{secrets.token_hex(12)}" for name in SECRETS}
    env = {**ENV, **markers}
    recipe = ref.recipe(work / "recipe.yaml", output_dir=work / "out", wandb_project="faults")
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(recipe), "--until", "filter", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    stdout, stderr = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    broken(row, result)
    # the run's own Ray session (its folder ends with the pid of the driver that started it), not
    # the newest one on the machine, which may be another test's
    sessions = list((Path(tempfile.gettempdir()) / "ray").glob(f"session_*_{proc.pid}"))
    found = files_holding(work / "out", [m.encode() for m in markers.values()])
    logs = [f for session in sessions for f in files_holding(session / "logs", [m.encode() for m in markers.values()])]
    row.extra = {
        "files_with_a_secret": found,
        "ray_sessions": len(sessions),
        "ray_logs_with_a_secret": logs,
        "wandb_runs": _wandb_runs(work / "out"),
    }
    row.rerun_exit_code = result.returncode
    compared(row, work / "out" / "ingest", ref.ingest)
    return row


def _wandb_runs(out: Path) -> int:
    return sum(1 for _ in out.rglob("offline-run-*"))


SCENARIOS: dict[str, Callable[[Path, Reference], Row]] = {
    "disk_full": disk_full,
    "object_store_killed": object_store_killed,
    "url_list_changed": url_list_changed,
    "hostile_url_list": hostile_url_list,
    "ray_head_running_then_stale": ray_head_running_then_stale,
    "secrets_in_files": secrets_in_files,
    "checkpoint_sigkill": checkpoint_sigkill,
    "damaged_encoded_shards": damaged_encoded_shards,
}


def run_scenario(name: str, work: Path, ref: Reference) -> Row:
    folder = work / name
    folder.mkdir(parents=True)
    started = time.monotonic()
    row = SCENARIOS[name](folder, ref)
    row.seconds = round(time.monotonic() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dalle-faults-"))
    ref = Reference(work)
    rows = [asdict(run_scenario(name, work, ref)) for name in args.only or SCENARIOS]
    print(json.dumps({"work": str(work), "scenarios": rows}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
