"""The train loop without Ray (benchmarks/train_loop.py's harness: ranks spawned with gloo, checkpoints
written by `TorchSession`): ZeRO-3 with every parameter partitioned, as at 12B, on 2 ranks trains,
evaluates (the EMA included) and exports exactly as 1 rank does; a SIGKILLed run resumes to the
uninterrupted run's losses and weights."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config.models import TransformerTrainConfig
from pipeline.data.loader import read_span
from pipeline.models.transformer import DalleConfig, load_dalle
from pipeline.stages.train_task import TransformerTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_loop import PARTITION_ALL, encoded_shards, exported, loop_spec, losses, partitions, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = DalleConfig(layers=2, heads=2, head_dim=8, text_len=8, text_vocab=50, image_grid=4, image_vocab=32)
COMPARED = ("loss", "text_loss", "image_loss", "heldout_loss", "ema_heldout_loss", "grad_norm")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """12 samples: 8 trained on (one update holds all 8, so 1 and 2 ranks see the same batches), 4 held out."""
    root = tmp_path_factory.mktemp("loop")
    spans = encoded_shards(root / "data", MODEL, samples=12, per_shard=6)
    train = TransformerTrainConfig(
        steps=4, batch_size=4, lr=1e-2, warmup_steps=1, zero_stage=3, ema_decay=0.5, grad_clip=1.0,
        checkpoint_every=2, log_every=1, keep_checkpoints=1, deepspeed=PARTITION_ALL,
    )  # fmt: skip
    spec = loop_spec(str(root / "two"), spans, MODEL, train, holdout=4, use_gpu=False)
    run_ranks(spec, 2, on_gpu=False)
    return root, spans, train, spec


def test_every_parameter_is_partitioned_across_the_two_ranks(two_ranks):
    _, _, _, spec = two_ranks
    for rank in (0, 1):
        held = partitions(spec.run_url, rank)
        assert held and all(part == math.ceil(whole / 2) and not kept for part, whole, kept in held.values()), held


def test_two_partitioned_ranks_train_evaluate_and_export_as_one(two_ranks):
    root, spans, train, two = two_ranks
    one_rank = train.model_copy(update={"grad_accum": 2})
    one = loop_spec(str(root / "one"), spans, MODEL, one_rank, holdout=4, use_gpu=False)
    run_ranks(one, 1, on_gpu=False)
    a, b = losses(two.run_url), losses(one.run_url)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a[4]["loss"] < a[1]["loss"]
    for step in a:
        for key in COMPARED:
            assert (key in a[step]) == (key in b[step]), (step, key)
            if key in a[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (step, key)
    # the EMA is what was evaluated as ema_: not the engine's weights (stale gathered copies would be)
    assert a[4]["ema_heldout_loss"] != pytest.approx(a[4]["heldout_loss"], rel=1e-6)
    weights_two, weights_one = exported(two.run_url), exported(one.run_url)
    assert weights_two.keys() == weights_one.keys()
    for name, value in weights_two.items():
        torch.testing.assert_close(value, weights_one[name], rtol=1e-5, atol=1e-6, msg=name)
    # the exported EMA weights give the EMA's logged held-out loss
    task = TransformerTask(two.config)
    held = [task.decode(s) for span in two.held_spans for s in read_span(span)]
    scores, _ = task.evaluate(load_dalle(two.out_url), held, torch.device("cpu"))
    assert scores["heldout_loss"] == pytest.approx(a[4]["ema_heldout_loss"], rel=1e-5)


def test_the_stage_compiled_path_trains_as_the_eager_one(two_ranks):
    """`train.compile: on` (the default on GPUs) compiles each block of the partitioned model: the same
    losses and held-out figures as the eager run. (Weights are not compared: a parameter with no
    gradient at all, such as the attention's key bias, takes Adam steps on rounding noise.)"""
    root, spans, train, two = two_ranks
    spec = loop_spec(
        str(root / "compiled"), spans, MODEL, train.model_copy(update={"compile": "on"}), holdout=4, use_gpu=False
    )
    run_ranks(spec, 2, on_gpu=False)
    a, b = losses(spec.run_url), losses(two.run_url)
    for step in b:
        for key in COMPARED:
            if key in b[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (step, key)


def test_a_sigkilled_partitioned_run_resumes_to_the_uninterrupted_losses_and_weights(two_ranks):
    root, spans, train, two = two_ranks
    spec = loop_spec(str(root / "killed"), spans, MODEL, train, holdout=4, use_gpu=False)
    run_ranks(spec, 2, on_gpu=False, kill_after=2)
    assert not (Path(spec.out_url) / "config.json").exists()  # killed before the end
    run_ranks(spec, 2, on_gpu=False)
    a, b = losses(spec.run_url), losses(two.run_url)
    assert [line["resumed_from"] for line in a.values() if "resumed_from" in line] == [2]
    for step in b:
        for key in COMPARED:
            if key in b[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-6), (step, key)
    for name, value in exported(two.run_url).items():
        torch.testing.assert_close(exported(spec.run_url)[name], value, rtol=0, atol=1e-7, msg=name)
    # TorchSession kept the newest checkpoint only (keep_checkpoints 1), as Ray Train would
    kept = sorted(p.name for p in (Path(spec.run_url) / "_train" / "run").iterdir())
    assert kept == ["checkpoint_00000004"]
    assert (
        json.loads((Path(spec.run_url) / "_train" / "run" / kept[-1] / "trainer_state.json").read_text())["step"] == 4
    )


def test_a_partitioned_run_killed_on_two_ranks_finishes_on_one_as_if_uninterrupted(two_ranks):
    """SIGKILLed on 2 ranks after checkpoint 2, the checkpoint converted (one task per old rank) and
    the run finished on 1 rank (its update: both lanes' micro-batches): the uninterrupted 2-rank run's
    losses, held-out figures (the EMA's included) and weights."""
    root, spans, train, two = two_ranks
    spec = loop_spec(str(root / "two-then-one"), spans, MODEL, train, holdout=4, use_gpu=False)
    run_ranks(spec, 2, on_gpu=False, kill_after=2)
    run_ranks(spec, 1, on_gpu=False)
    a, b = losses(spec.run_url), losses(two.run_url)
    assert [line["resumed_from"] for line in a.values() if "resumed_from" in line] == [2]
    for step in b:
        for key in COMPARED:
            if key in b[step]:
                assert a[step][key] == pytest.approx(b[step][key], rel=1e-5), (step, key)
    for name, value in exported(two.run_url).items():
        torch.testing.assert_close(exported(spec.run_url)[name], value, rtol=1e-5, atol=1e-6, msg=name)
