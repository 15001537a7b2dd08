"""Output on S3 (moto's server on loopback, reached through s3fs and Ray Train's pyarrow S3): the
shared small run (ingest → encode) made again with `output_dir` on S3, SIGKILLed in the middle of
dVAE training and resumed from its checkpoint there, must equal the uninterrupted local run:
the same ledgers, the same samples (missing 0, duplicate 0), the same dVAE."""

from __future__ import annotations

import time

import boto3
import pytest
import s3fs
import torch
import yaml
from helpers import ENV, ROOT, compare_stage, kill_run_when, run_until

from pipeline import storage, workflow
from pipeline.config.recipe import load_recipe
from pipeline.engine.ledger import Ledger
from pipeline.models.dvae import load_dvae
from pipeline.observe.tracking import read_metrics
from pipeline.synthetic.s3_server import CLEARED, client_env, start_s3_server
from pipeline.train.checkpoint import PREFIX

pytestmark = pytest.mark.slow


BUCKET = "runs"
REQUESTS: list[tuple[str, str]] = []
"""(method, path) of every request the S3 server answered."""
STAGES = ("ingest", "filter", "text-tokenizer", "dvae", "clip", "encode")


@pytest.fixture(scope="module")
def bucket():
    """An empty bucket on a moto server; this process and every `dalle` it starts (with their
    Ray workers) reach it through the standard AWS environment variables."""
    server = start_s3_server(lambda method, path: REQUESTS.append((method, path)))
    env = client_env(server)
    saved = dict(ENV)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in CLEARED:
                mp.delenv(name, raising=False)
                ENV.pop(name, None)
            for name, value in env.items():
                mp.setenv(name, value)
            ENV.update(env)
            s3fs.S3FileSystem.clear_instance_cache()
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
    finally:
        ENV.clear()
        ENV.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def resumed(bucket, run, tmp_path_factory):
    """The shared run's recipe with its output on S3 (the same synthetic server port, so the same
    samples), killed after dVAE checkpoint 30 of 60 and run again: (S3 URL, local reference)."""
    local, recipe = run
    data = yaml.safe_load(recipe.read_text())
    out = data["output_dir"] = f"{bucket}/run"
    path = tmp_path_factory.mktemp("s3") / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    start = time.monotonic()

    def past_checkpoint() -> bool:  # every rank has written checkpoint 30 once rank 0 reports step 35
        time.sleep(0.2)  # poll the object store a few times a second
        progress = storage.read_json_or_none(storage.join(out, "dvae", "_train", "progress.json"))
        return progress is not None and progress["step"] >= 35

    kill_run_when(["run", str(path), "--until", "encode", "--no-progress"], past_checkpoint, timeout=400)
    assert not storage.exists(storage.join(out, "dvae", "_done.json"))
    status = {r.stage: r for r in workflow.status(load_recipe(str(path)))}
    assert status["dvae"].state == "partial" and status["dvae"].training.steps == 60
    run_until(path, "encode")
    print(f"S3 run with one SIGKILL, ingest to encode: {time.monotonic() - start:.1f} s")
    return out, local


def test_every_stage_commits_the_same_shards_on_s3_as_on_local_disk(resumed):
    out, local = resumed
    for stage in STAGES:
        assert storage.exists(storage.join(out, stage, "_done.json")), stage
        got, want = Ledger(storage.join(out, stage)).done(), Ledger(str(local / stage)).done()
        assert sorted(got) == sorted(want), stage
        for shard, record in got.items():
            other = want[shard]
            assert (record.files, record.samples_in, record.samples_out, record.counts) == (
                other.files,
                other.samples_in,
                other.samples_out,
                other.counts,
            ), (stage, shard)
    for stage in ("filter", "encode"):  # sample by sample, member by member
        result = compare_stage(storage.join(out, stage), local / stage)
        assert (result["missing"], result["duplicate"], result["extra"], result["different"]) == (0, 0, 0, 0), result
    assert not (ROOT / "s3:").exists()  # no URL was taken for a relative local path


def test_dvae_training_resumed_from_its_checkpoint_on_s3(resumed):
    out, local = resumed
    metrics = read_metrics(storage.join(out, "dvae", "metrics.jsonl"))
    assert [m["resumed_from"] for m in metrics if "resumed_from" in m] == [30]
    want = {m["step"]: m["loss"] for m in read_metrics(str(local / "dvae" / "metrics.jsonl")) if "loss" in m}
    got = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(m["step"] for m in metrics if "loss" in m) == sorted(want)  # every step logged once
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    ours, theirs = load_dvae(storage.join(out, "dvae", "dvae.pt")), load_dvae(str(local / "dvae" / "dvae.pt"))
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # each rank fetched its own EMA shard of the checkpoint it resumed from, once, and not the other's
    resumed_from = f"/{BUCKET}/run/dvae/_train/run/{PREFIX}"
    gets = [p for m, p in REQUESTS if m == "GET" and p.startswith(resumed_from) and "/ema/" in p]
    shards = {p.rsplit("/", 1)[1] for p in gets}
    assert shards == {"rank_00000.pt", "rank_00001.pt"} and len(gets) == 2, gets
    # W&B writes to local disk; its files are copied to the stage folder on S3
    fs, path = storage.get_fs(storage.join(out, "dvae", "wandb"))
    assert any(p.endswith(".wandb") and "/offline-run-" in p for p in fs.find(path))
    # nothing of the killed attempt is left where readers look
    fs, path = storage.get_fs(out)
    assert not [p for p in fs.find(path) if "/_tmp/" in p or ".tmp-" in p]
