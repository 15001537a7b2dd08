"""The train stage end to end at test size on the encoded synthetic shards: real Ray Train with 2
CPU workers, real DeepSpeed (ZeRO-2 and ZeRO-3, gloo). The loss falls; a worker killed mid-run is
restarted from the last checkpoint by Ray and the run trains on exactly the samples of an
uninterrupted run; a SIGKILLed run whose newest checkpoint lost a rank's file resumes from the one
before, on another world size (2, 1, 2), and ends with the uninterrupted run's samples and losses;
`dalle export` gives the engine's weights."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import torch
import yaml
from helpers import (
    UPSTREAM,
    dalle,
    kill_run_when,
    recipe_at,
    run_until,
    session_pids,
    train_sample_keys,
    train_step,
    train_update_keys,
)

from pipeline.config.models import TrainConfig
from pipeline.data.loader import read_span, split_holdout
from pipeline.engine.ledger import Ledger
from pipeline.errors import StageFailed
from pipeline.models.transformer import load_dalle
from pipeline.observe.tracking import read_metrics
from pipeline.stages.train_task import TransformerTask
from pipeline.train import checkpoint
from pipeline.train.trainer import prepare_resume

pytestmark = pytest.mark.slow


def _train_recipe(tmp_path, run, transformer=None, **train):
    recipe, out = recipe_at(tmp_path, run, UPSTREAM)
    data = yaml.safe_load(recipe.read_text())
    data["transformer"].update(transformer or {})
    data["transformer"]["train"].update(train)
    recipe.write_text(yaml.safe_dump(data))
    return recipe, out


def _losses(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(str(out / "train" / "metrics.jsonl")) if "loss" in m}


@pytest.fixture(scope="module")
def reference(trained):
    """The shared uninterrupted ZeRO-2 run of 40 updates (conftest's `trained`)."""
    return trained


def test_zero2_training_lowers_the_loss_and_reports_its_throughput(reference):
    lines = [m for m in read_metrics(str(reference / "train" / "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(2, 41, 2))
    first, last = lines[0], lines[-1]
    assert last["loss"] < first["loss"] - 0.5, (first["loss"], last["loss"])
    assert last["image_loss"] < first["image_loss"] and last["text_loss"] < first["text_loss"]
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "rss_gb"):
        assert last[key] > 0, key
    cfg = TransformerTask(json.loads((reference / "train" / "config.json").read_text())).cfg
    assert last["tokens_per_s"] == pytest.approx(last["samples_per_s"] * cfg.seq_len)
    scores = json.loads((reference / "train" / "metrics.json").read_text())
    assert scores["step"] == 40 and 0 < scores["heldout_loss"] < first["loss"]
    keys = train_sample_keys(reference)
    assert sorted(keys) == [0, 1] and all(len(steps) == 40 for steps in keys.values())
    assert all(len(step) == 8 for steps in keys.values() for step in steps)
    first_epoch = [set(k for step in keys[r][:4] for k in step) for r in (0, 1)]
    assert not first_epoch[0] & first_epoch[1]
    model = load_dalle(str(reference / "train"))
    assert model.cfg == cfg
    assert checkpoint.checkpoints(str(reference / "train" / "_train" / "run")) == [
        "checkpoint_00000040",
        "checkpoint_00000030",
        "checkpoint_00000020",
    ]  # keep_checkpoints: 3


def _train_worker_pids(sid: int) -> list[int]:
    """The Ray Train workers of the run whose processes form session `sid` (never another run's)."""
    pids = []
    for pid in session_pids(sid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, run):
    """One training interrupted three times, for the three tests below. On 2 workers: one of its
    Ray Train workers SIGKILLed between checkpoints 10 and 20 (Ray Train restarts the group from 10
    within the run), then every process of the run SIGKILLed after step 22, and one rank's file of
    its newest checkpoint (20) deleted. Then on 1 worker: it resumes from 10 (20 is incomplete; the
    checkpoint converted, the rank fetching its own partitions, each update's two micro-batches on
    one rank) and is SIGKILLed after step 32. Then on 2 workers again, from 30, to the end."""
    recipe, out = _train_recipe(tmp_path_factory.mktemp("interrupted"), run)
    progress = out / "train" / "_train" / "progress.json"
    run_dir = out / "train" / "_train" / "run"
    seen = {"session": None, "pids": [], "listed": 0.0, "worker_killed_at": None}

    def ready() -> bool:
        """Kills one worker at step 12 (found ahead, so the kill itself is immediate); then the
        whole run at step 22 of the restarted group."""
        step = train_step(progress)
        if seen["worker_killed_at"] is not None:
            return step >= 22
        if not seen["pids"] and time.monotonic() - seen["listed"] > 0.2:
            seen["pids"], seen["listed"] = _train_worker_pids(seen["session"]), time.monotonic()
        if seen["pids"] and step >= 12:
            os.kill(seen["pids"][-1], signal.SIGKILL)
            seen["worker_killed_at"] = step
        return False

    kill_run_when(
        ["run", str(recipe), "--until", "train", "--no-progress"],
        ready,
        timeout=500,
        started=lambda sid: seen.update(session=sid),
    )
    metrics = read_metrics(str(out / "train" / "metrics.jsonl"))
    keys = train_sample_keys(out)  # what the two workers trained on, restart included
    newest = run_dir / "checkpoint_00000020"
    complete_at_kill = checkpoint.problem(str(newest)) is None
    run_id = json.loads((run_dir / "checkpoint_00000010" / "trainer_state.json").read_text())["run_id"]
    rank1 = json.loads((newest / "ranks" / "rank_00001.json").read_text())
    (newest / sorted(f for f in rank1 if f.startswith("deepspeed/"))[0]).unlink()
    problem = checkpoint.problem(str(newest))
    one_worker = kill_run_when(
        ["run", str(recipe), "--until", "train", "--no-progress", "-v", "transformer.train.workers=1"],
        lambda: train_step(progress) >= 32,
        timeout=500,
    )
    world_of_30 = json.loads((run_dir / "checkpoint_00000030" / "trainer_state.json").read_text())["world"]
    final = dalle("run", str(recipe), "--until", "train", "--no-progress", timeout=600)
    return {
        "out": out,
        "worker_killed_at": seen["worker_killed_at"],
        "resumed_before_the_kill": [m["resumed_from"] for m in metrics if "resumed_from" in m],
        "losses_before_the_kill": {m["step"]: m["loss"] for m in metrics if "loss" in m},
        "keys_before_the_kill": keys,
        "newest_complete_at_kill": complete_at_kill,
        "newest_problem": problem,
        "run_id": run_id,
        "one_worker": one_worker,
        "world_of_30": world_of_30,
        "final": final,
    }


def test_a_killed_worker_is_restarted_from_the_last_checkpoint_with_the_same_samples(interrupted, reference):
    killed = interrupted["worker_killed_at"]
    assert killed is not None and killed < 20, f"the worker was not killed between checkpoints 10 and 20 ({killed})"
    # Ray Train restarted the group from checkpoint 10 within the run, before the run was killed
    assert interrupted["resumed_before_the_kill"] == [10]
    # both ranks trained on the uninterrupted run's samples, step by step, through checkpoint 20
    got, want = interrupted["keys_before_the_kill"], train_sample_keys(reference)
    assert sorted(got) == [0, 1] and all(len(steps) >= 20 for steps in got.values()), {
        r: len(s) for r, s in got.items()
    }
    assert {r: want[r][: len(steps)] for r, steps in got.items()} == got
    losses, ref = interrupted["losses_before_the_kill"], _losses(reference)
    assert max(losses) >= 20 and losses == pytest.approx({s: ref[s] for s in losses}, rel=1e-4)


def test_a_sigkilled_run_skips_an_incomplete_newest_checkpoint_and_ends_like_an_uninterrupted_one(
    interrupted, reference
):
    out, printed = interrupted["out"], interrupted["one_worker"]
    assert interrupted["newest_complete_at_kill"]  # the kill came after checkpoint 20 was whole
    assert "missing" in interrupted["newest_problem"]  # until one rank's file was deleted
    assert "incomplete" in printed and "checkpoint_00000020" in printed
    assert "started a Ray of this process's own" in printed  # (-v; a finished rerun starts none)
    result = interrupted["final"]
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(str(out / "train" / "metrics.jsonl"))
    # the worker's restart, the rerun (from 10: 20 is skipped), the last run (from 30)
    assert [m["resumed_from"] for m in metrics if "resumed_from" in m] == [10, 10, 30]
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-3)  # one worker in between: see below
    # the resumed runs continued the same W&B run
    run_dir = out / "train" / "_train" / "run"
    run_id = interrupted["run_id"]
    assert json.loads((run_dir / "checkpoint_00000040" / "trainer_state.json").read_text())["run_id"] == run_id
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (out / "train" / "wandb").glob("offline-run-*")}
    assert wandb_runs == {run_id}


def test_a_run_resumes_on_another_world_size_2_1_2_with_the_samples_of_an_uninterrupted_run(interrupted, reference):
    """The chain above ran on 2 workers to step 22, on 1 from checkpoint 10 to step 32, on 2 again
    from 30: every update trains on the uninterrupted run's samples."""
    out = interrupted["out"]
    run_dir = out / "train" / "_train" / "run"
    assert interrupted["world_of_30"] == 1
    assert json.loads((run_dir / "checkpoint_00000040" / "trainer_state.json").read_text())["world"] == 2
    assert (run_dir / "checkpoint_00000010" / "reshard.json").exists()  # converted for the one worker
    got, ref = train_update_keys(out), train_update_keys(reference)
    assert sorted(got) == list(range(1, 41))
    missing = sum((Counter(ref[s]) - Counter(got[s])).total() for s in ref)
    duplicate = sum((Counter(got[s]) - Counter(ref[s])).total() for s in ref)
    assert (missing, duplicate) == (0, 0) and got == ref
    # the same updates from the same states: the losses follow the uninterrupted run's
    assert _losses(out) == pytest.approx(_losses(reference), rel=1e-3)


def test_zero3_with_ema_trains_and_exports_the_engine_and_ema_weights(tmp_path, run):
    """ZeRO-3 with a sharded EMA, activation checkpointing and 2 DataLoader workers per rank."""
    recipe, out = _train_recipe(
        tmp_path, run, {"checkpoint_activations": True}, zero_stage=3, ema_decay=0.9, steps=10, loader_workers=2
    )
    run_until(recipe, "train")
    lines = [m for m in read_metrics(str(out / "train" / "metrics.jsonl")) if "loss" in m]
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5
    final = {k: v for m in read_metrics(str(out / "train" / "metrics.jsonl")) if m["step"] == 10 for k, v in m.items()}

    stage = out / "train"
    task = TransformerTask(json.loads((stage / "config.json").read_text()))
    _, held_spans = split_holdout(Ledger(str(out / "encode")).spans(), 16)
    held = [task.decode(s) for span in held_spans for s in read_span(span)]

    for weights, prefix in (("model", "heldout_"), ("ema", "ema_heldout_")):
        target = tmp_path / f"export-{weights}"
        result = dalle("export", str(stage), str(target), "--weights", weights)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"step 10 ({weights} weights" in result.stdout
        model = load_dalle(str(target))
        scores, _ = task.evaluate(model, held, torch.device("cpu"))
        assert scores["heldout_loss"] == pytest.approx(final[f"{prefix}loss"], rel=1e-5)
    # the stage's own weights are the EMA gathered from the live shards: the same weights
    committed, exported = load_dalle(str(stage)), load_dalle(str(tmp_path / "export-ema"))
    for (name, a), (_, b) in zip(committed.state_dict().items(), exported.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # loaded straight into bf16, they give the logged held-out loss up to bf16 rounding
    bf16 = load_dalle(str(stage), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    scores, _ = task.evaluate(bf16, held, torch.device("cpu"))
    assert scores["heldout_loss"] == pytest.approx(final["ema_heldout_loss"], rel=2e-2)


def test_export_and_resume_refuse_bad_input_with_one_line(tmp_path, reference):
    result = dalle("export", str(tmp_path / "nothing"), str(tmp_path / "out"))
    assert result.returncode == 2 and "no complete training checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    run_dir = str(reference / "train" / "_train" / "run")
    url, state = checkpoint.resumable(run_dir)
    assert state["step"] == 40 and (state["world"], state["lanes"], state["per_lane"]) == (2, 2, 1)
    for world in (1, 2):  # a worker count that shares the updates equally needs no conversion check here
        prepare_resume("train", run_dir, TrainConfig(workers=world, zero_stage=0))
    with pytest.raises(StageFailed) as err:
        prepare_resume("train", run_dir, TrainConfig(workers=3, zero_stage=0))
    assert str(err.value) == (
        f"stage 'train': cannot resume {url} on 3 workers: the run's updates are 2 micro-batches (2 lanes x 1), "
        "which 3 workers cannot share equally; use a worker count that divides 2"
    )
    # each rank of the run reads only its own partitions and the shared files to resume
    own = [set(checkpoint.rank_files(url, r)) for r in range(2)]
    shared = {"trainer_state.json", "task.json", "param_shapes.json", "latest", "zero_to_fp32.py", "zero_to_torch.py"}
    assert own[0] & own[1] == shared | {"deepspeed/mp_rank_00_model_states.pt"}
    for rank, files in enumerate(own):
        assert {f for f in files if "zero_pp_rank" in f} == {
            f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        }
