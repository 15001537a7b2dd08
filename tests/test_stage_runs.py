"""The W&B runs of the stages that do not train: with `wandb_project` set, ingest, filter and
text-tokenizer each log one run (offline here) with shard counts, throughput, drops and example
images, and a rerun continues the same run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT, dalle, free_port, small_recipe

from pipeline.engine.ledger import Ledger
from pipeline.observe.stage_runs import examples
from pipeline.observe.tracking import read_metrics

pytestmark = pytest.mark.slow

STAGES = ("ingest", "filter", "text-tokenizer")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage-runs")
    recipe = small_recipe(tmp / "recipe.yaml", tmp / "out", port=free_port())
    result = dalle("run", str(recipe), "wandb_project=dalle-test", "--until", "text-tokenizer", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", recipe


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_one_run_with_its_counts(tracked, stage):
    out, _ = tracked
    info = json.loads((out / stage / "tracking.json").read_text())
    assert (info["name"], info["project"], info["mode"]) == (f"demo-{stage}", "dalle-test", "offline")
    runs = list((out / stage / "wandb").glob(f"offline-run-*-{info['run_id']}"))
    assert len(runs) == 1
    lines = read_metrics(str(out / stage / "metrics.jsonl"))
    records = Ledger(str(out / stage)).done().values()
    assert [m["shards_done"] for m in lines] == list(range(1, len(records) + 1))
    last = lines[-1]
    assert last["samples_out"] == sum(r.samples_out for r in records)
    assert last["samples_in"] == sum(r.samples_in for r in records)
    drops = {k.removeprefix("drops/"): v for k, v in last.items() if k.startswith("drops/") and v}
    counted: dict[str, int] = {}
    for r in records:
        for reason, n in r.counts.items():
            counted[reason] = counted.get(reason, 0) + n
    assert drops == {k: v for k, v in counted.items() if v}
    assert all(m["samples_per_s"] > 0 for m in lines)


@pytest.mark.parametrize("stage", ["ingest", "filter"])
def test_example_images_are_logged_once_per_data_stage(tracked, stage):
    out, _ = tracked
    run = next((out / stage / "wandb").glob("offline-run-*"))
    media = list(run.rglob("media/images/**/*.png"))
    assert 1 <= len(media) <= 8, media
    record = sorted(Ledger(str(out / stage)).done().values(), key=lambda r: r.finished_at)[0]
    shown = examples(str(out / stage), record)
    assert 0 < len(shown) <= 8
    image, caption = shown[0]
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8"
    assert caption.strip()


def test_an_online_project_without_an_api_key_is_one_line(tmp_path):
    recipe = small_recipe(tmp_path / "recipe.yaml", tmp_path / "out", port=free_port())
    env = {**ENV, "WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_API_KEY": ""}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(recipe),
        "wandb_project=dalle-test",
        "--until",
        "ingest",
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dalle: error: W&B run demo-ingest (project dalle-test):"), lines


def test_a_resumed_stage_continues_its_run_and_no_run_without_a_project(tracked, run):
    out, recipe = tracked
    run_id = json.loads((out / "filter" / "tracking.json").read_text())["run_id"]
    # as if the run had died before committing filter's last shard (and compacting its ledger)
    newest = max((out / "filter" / "_ledger").glob("*.json"), key=lambda p: p.stat().st_mtime)
    newest.unlink()
    (out / "filter" / "_ledger" / "_summary.parquet").unlink()
    (out / "filter" / "_done.json").unlink()
    result = dalle("run", str(recipe), "wandb_project=dalle-test", "--until", "text-tokenizer", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "filter" / "tracking.json").read_text())["run_id"] == run_id
    runs = list((out / "filter" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[-1] for r in runs} == {run_id}

    # the shared run of the other tests sets no project: no driver-logged runs there
    plain, _ = run
    assert not any((plain / stage / "tracking.json").exists() for stage in STAGES)
