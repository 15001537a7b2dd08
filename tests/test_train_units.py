"""Trainer plumbing as pure functions: schedules, the dVAE's paper schedules, the DeepSpeed config,
EMA, per-step seeds."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from pipeline.config.models import DVAESection, TrainConfig
from pipeline.stages.dvae_task import codebook_stats, noise_scale, schedules
from pipeline.train.ema import EMA, merged_tensors, reshard
from pipeline.train.engine import deepspeed_config, merge
from pipeline.train.evaluation import sharded_means, share
from pipeline.train.loop import step_seed, window_means
from pipeline.train.schedules import cosine, learning_rate


def test_cosine_goes_from_start_to_end_and_stays():
    assert cosine(1.0, 0.0, 0, 100) == 1.0
    assert cosine(1.0, 0.0, 50, 100) == pytest.approx(0.5)
    assert cosine(1.0, 0.0, 100, 100) == pytest.approx(0.0)
    assert cosine(1.0, 0.0, 500, 100) == pytest.approx(0.0)
    values = [cosine(1.0, 1 / 16, s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_dvae_schedules_are_the_papers():
    cfg = DVAESection()
    assert (cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps) == (1.0, 1 / 16, 150_000)
    assert (cfg.kl_weight, cfg.kl_steps) == (6.6, 5000)
    assert schedules(cfg, 0) == (1.0, 0.0)
    t, kl = schedules(cfg, 5000)
    assert kl == pytest.approx(6.6) and 1 / 16 < t < 1.0
    assert schedules(cfg, 150_000) == (pytest.approx(1 / 16), pytest.approx(6.6))
    assert schedules(cfg, 75_000)[0] == pytest.approx((1 + 1 / 16) / 2)
    # the paper's noise stays full; a short run can anneal it towards the argmax codes
    assert noise_scale(cfg, 10**6) == 1.0
    short = DVAESection(temperature_steps=100, gumbel_noise_end=0.0)
    assert (noise_scale(short, 0), noise_scale(short, 50), noise_scale(short, 100)) == (1.0, pytest.approx(0.5), 0.0)


def test_learning_rate_warms_up_linearly_then_decays_to_min():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(10, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(110, cfg) == pytest.approx(1e-5)


def test_deepspeed_config_from_the_recipe():
    cfg = TrainConfig(batch_size=8, grad_accum=4, zero_stage=2, grad_clip=4.0, precision="bf16")
    cpu = deepspeed_config(cfg, world=2, on_gpu=False)
    assert cpu["train_batch_size"] == 8 * 4 * 2 and cpu["zero_optimization"] == {"stage": 2}
    assert cpu["gradient_clipping"] == 4.0
    assert "optimizer" not in cpu and "bf16" not in cpu  # torch AdamW, fp32 on CPU
    gpu = deepspeed_config(cfg, world=2, on_gpu=True)
    # torch's fused AdamW on GPUs (built by `build_engine`: no nvcc build of DeepSpeed's FusedAdam)
    assert gpu["bf16"] == {"enabled": True} and "optimizer" not in gpu
    offload = deepspeed_config(cfg.model_copy(update={"offload_optimizer": True}), world=2, on_gpu=True)
    assert offload["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam for the host-side step
    fp16 = deepspeed_config(cfg.model_copy(update={"precision": "fp16"}), world=1, on_gpu=True)
    assert fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    raw = cfg.model_copy(update={"deepspeed": {"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5}})
    merged = deepspeed_config(raw, world=1, on_gpu=False)
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True} and merged["steps_per_print"] == 5


def test_merge_is_recursive_and_does_not_modify_its_inputs():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    out = merge(base, {"a": {"c": 5}, "e": 6})
    assert out == {"a": {"b": 1, "c": 5}, "d": 3, "e": 6}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


def test_ema_shards_track_the_weights_and_merge_back():
    """Three ranks each keep a third of every parameter (7 and 3 elements: padded slices);
    merged, the shards are the EMA of the whole weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 1)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    shards = [EMA(model, decay=0.5, rank=r, world=3) for r in range(3)]
    assert [s.shadow["weight"].numel() for s in shards] == [3, 3, 3]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for shard in shards:
        shard.update(model)
    merged = dict(merged_tensors([s.state_dict() for s in reversed(shards)]))
    for name, value in start.items():
        torch.testing.assert_close(merged[name], value + 0.5)
    again = EMA(model, decay=0.5, rank=1, world=3)
    again.load_state_dict(shards[1].state_dict())
    torch.testing.assert_close(again.shadow["weight"], shards[1].shadow["weight"])
    with pytest.raises(ValueError, match="does not match"):
        again.load_state_dict(shards[2].state_dict())
    with pytest.raises(ValueError, match="do not cover"):
        dict(merged_tensors([shards[0].state_dict(), shards[2].state_dict()]))


def test_step_seeds_differ_by_step_rank_and_micro_batch():
    seeds = {step_seed(0, s, r, m) for s in range(50) for r in range(4) for m in range(3)}
    assert len(seeds) == 50 * 4 * 3


def test_codebook_stats():
    k = 16
    uniform = torch.zeros(2, k, 4, 4)
    assert float(codebook_stats(uniform)["perplexity"]) == pytest.approx(k)
    peaked = torch.full((2, k, 4, 4), -1e4)
    peaked[:, 3] = 0
    peaked[0, 5, 0, 0] = 1.0  # one position picks another code
    stats = {name: float(value) for name, value in codebook_stats(peaked).items()}
    assert 1.0 < stats["perplexity"] < 1.2 and stats["codebook_usage"] == 2 / k
    assert math.isfinite(stats["perplexity"])


def test_window_means_read_device_tensors_and_floats_alike():
    window = [{"loss": torch.tensor(1.0), "lr": 0.5}, {"loss": torch.tensor(3.0, dtype=torch.bfloat16), "lr": 1.5}]
    assert window_means(window) == {"loss": 2.0, "lr": 1.0}


def test_ema_shards_of_one_world_reshard_for_another():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
    saved = [EMA(model, decay=0.5, rank=r, world=3).state_dict() for r in range(3)]
    for world in (1, 2, 4):
        cut = [reshard(saved, r, world) for r in range(world)]
        assert {c["world"] for c in cut} == {world} and [c["rank"] for c in cut] == list(range(world))
        for name, value in merged_tensors(cut):
            torch.testing.assert_close(value, dict(model.named_parameters())[name].detach())
        fresh = EMA(model, decay=0.5, rank=world - 1, world=world)
        fresh.load_state_dict(cut[-1])  # the layout a rank of that world would have made itself
        assert all(torch.equal(fresh.shadow[k], v) for k, v in EMA(model, 0.5, world - 1, world).shadow.items())


def test_each_rank_evaluates_an_equal_padded_share_and_the_means_count_real_samples_only():
    held = list(range(7))
    parts = [share(held, r, 3) for r in range(3)]
    assert parts == [([0, 1, 2], 3), ([3, 4, 5], 3), ([6, 0, 0], 1)]
    assert share([], 0, 2) == ([], 0)
    assert share([1], 1, 2) == ([1], 0)  # a rank past the end still runs the collective forwards
    means = sharded_means({"loss": np.array([1.0, 3.0, 100.0])}, real=2)  # one process: its own share
    assert means == {"loss": 2.0}


def _encoded_shards(tmp_path, captions):
    """Two encoded shards (text tokens from the plain tokenizer, as encode writes them) and the
    tokenizer's URL."""
    from pipeline.data.loader import ShardSpan
    from pipeline.data.shards import npy_bytes, write_tar
    from pipeline.models.bpe import TextTokenizer, train_tokenizer

    tok = train_tokenizer(captions, vocab_size=300)
    url = tmp_path / "tokenizer.json"
    url.write_text(tok.to_str())
    text = TextTokenizer(tok, 32)
    spans = []
    for s in range(2):
        samples = [
            {
                "__key__": f"{s:05d}{i:04d}",
                "txt": captions[s * 6 + i],
                "text_tokens.npy": npy_bytes(text.encode(captions[s * 6 + i]).astype(np.uint16)),
                "image_tokens.npy": npy_bytes(np.full(4, i, dtype=np.uint16)),
            }
            for i in range(6)
        ]
        write_tar(str(tmp_path / f"{s:05d}.tar"), samples)
        spans.append(ShardSpan(str(tmp_path / f"{s:05d}.tar"), 6))
    return spans, str(url)


def test_bpe_dropout_retokenizes_training_samples_reproducibly_across_a_resume(tmp_path):
    import itertools

    from pipeline.data.loader import ShardStream, read_span
    from pipeline.stages.train_task import TransformerTask

    words = ["red circle", "blue square", "green triangle", "yellow square", "small red", "large blue"]
    places = ("left", "right", "top")
    captions = [f"a {words[i % 6]} on the {places[i % 3]} beside {words[(i + 2) % 6]}" for i in range(12)]
    spans, tokenizer = _encoded_shards(tmp_path, captions * 4)
    model = {"text_len": 32, "text_vocab": 300, "image_grid": 2, "image_vocab": 8, "layers": 1, "heads": 2}

    def task(p, seed=0):
        return TransformerTask({"model": model, "bpe_dropout": p, "seed": seed, "models": {"tokenizer": tokenizer}})

    def texts(t, n=24, position=0):
        stream = ShardStream(spans, rank=0, world=1, seed=0, decode=t.decode)
        return [tuple(text) for text, _ in itertools.islice(stream.samples(position), n)]

    stored = texts(task(0.0))
    dropped = texts(task(0.3))
    assert dropped == texts(task(0.3))  # a pure function of (seed, epoch, key)
    assert dropped[7:] == texts(task(0.3), n=17, position=7)  # a resumed stream draws the same
    assert sum(a != b for a, b in zip(dropped, stored)) >= 6  # dropout changes tokens...
    epochs = {}
    for (text, _), sample in zip(
        itertools.islice(ShardStream(spans, rank=0, world=1, seed=0, decode=task(0.3).decode).samples(), 24),
        itertools.islice(ShardStream(spans, rank=0, world=1, seed=0, decode=lambda s: s["__key__"]).samples(), 24),
    ):
        epochs.setdefault(sample, []).append(tuple(text))
    assert any(a != b for a, b in epochs.values())  # ...and again each epoch
    assert texts(task(0.3, seed=1)) != dropped
    # at 0 the encoded tokens are used as they are; held-out samples (no epoch) never drop
    held = read_span(spans[0])
    assert [tuple(task(0.3).decode(s)[0]) for s in held] == [tuple(task(0.0).decode(s)[0]) for s in held]
    with pytest.raises(ValueError, match="tokenizer"):
        TransformerTask({"model": model, "bpe_dropout": 0.1})


def test_empty_captions_replace_a_seeded_share_of_training_captions(tmp_path):
    """`null_caption_prob`: a training sample's caption is the empty one (all padding) with that
    probability, drawn from (seed, epoch, key) on a stream of its own: the same draws on a resumed
    stream, the BPE dropout of the other samples unchanged, held-out samples never emptied."""
    import itertools

    from pipeline.data.loader import ShardStream, read_span
    from pipeline.stages.train_task import TransformerTask

    captions = [f"a {c} {s} on the left" for c in ("red", "blue", "green") for s in ("circle", "square")]
    spans, tokenizer = _encoded_shards(tmp_path, captions * 8)
    model = {"text_len": 32, "text_vocab": 300, "image_grid": 2, "image_vocab": 8, "layers": 1, "heads": 2}

    def task(null, bpe=0.0, seed=0):
        config = {"model": model, "bpe_dropout": bpe, "null_caption_prob": null, "seed": seed}
        return TransformerTask({**config, "models": {"tokenizer": tokenizer}})

    def texts(t, n=96, position=0):
        stream = ShardStream(spans, rank=0, world=1, seed=0, decode=t.decode)
        return [tuple(text) for text, _ in itertools.islice(stream.samples(position), n)]

    empty = (0,) * 32
    stored, nulled = texts(task(0.0)), texts(task(0.25))
    share = sum(t == empty for t in nulled) / len(nulled)
    assert 0.1 < share < 0.45 and not any(t == empty for t in stored)
    assert all(t in (s, empty) for t, s in zip(nulled, stored))  # a caption is kept whole or emptied
    assert nulled[30:] == texts(task(0.25), n=66, position=30)  # a resumed stream draws the same
    assert texts(task(0.25, seed=1)) != nulled
    # its own stream: the kept captions get the BPE dropout a run without empty captions gives them
    dropped, both = texts(task(0.0, bpe=0.3)), texts(task(0.25, bpe=0.3))
    assert [t for t in both if t != empty] == [d for d, n in zip(dropped, nulled) if n != empty]
    held = read_span(spans[0])
    assert [tuple(task(0.9).decode(s)[0]) for s in held] == [tuple(task(0.0).decode(s)[0]) for s in held]


def test_a_save_sweeps_the_staging_folders_of_ranks_that_died_mid_save(tmp_path, monkeypatch):
    import subprocess
    import tempfile

    from pipeline.train import checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    for name in (f"dalle-ckpt-{dead.pid}-abc", f"dalle-ckpt-{os.getpid()}-def", "dalle-ckpt-x-1", "other-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mp_rank_00_model_states.pt").write_bytes(b"0" * 10)
    checkpoint._sweep_orphans()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"dalle-ckpt-{os.getpid()}-def", "dalle-ckpt-x-1", "other-1"]
    )


def test_compile_is_on_for_gpus_by_default_and_compiles_each_block():
    from pipeline.models.transformer import Dalle, DalleConfig
    from pipeline.train.engine import build_model, compiles

    assert compiles(TrainConfig(), on_gpu=True) and not compiles(TrainConfig(), on_gpu=False)
    assert compiles(TrainConfig(compile="on"), on_gpu=False) and not compiles(TrainConfig(compile="off"), on_gpu=True)
    cfg = DalleConfig(layers=2, heads=2, head_dim=8, text_len=4, text_vocab=10, image_grid=2, image_vocab=8)
    model = build_model(lambda: Dalle(cfg), TrainConfig(compile="on"), 1, on_gpu=False)
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None  # the blocks, not the whole model
    eager = build_model(lambda: Dalle(cfg), TrainConfig(), 1, on_gpu=False)
    assert all(block._compiled_call_impl is None for block in eager.blocks)


@pytest.mark.parametrize("zero_stage", [1, 3])
@pytest.mark.parametrize(("old", "new"), [(4, 1), (4, 3), (3, 2), (2, 5)])
def test_the_converted_layout_gives_each_new_rank_exactly_its_elements_once(zero_stage, old, new):
    """From the layout alone a new rank finds every element it needs in the old ranks' files: the
    pieces the old ranks hold cover each parameter exactly once, the owners of a range are exactly
    the ranks holding part of it, and a file's offsets advance by its pieces."""
    from pipeline.train.reshard import KEYS, Layout

    shapes = [[7, 3], [5], [1], [4, 4], [9]]
    numels = [math.prod(s) for s in shapes]
    offsets, partitions = [0] * 5, []
    if zero_stage < 3:  # one group, parameters end to end, padded to a multiple of the world
        offsets = [sum(numels[:i]) for i in range(5)]
        partitions = [math.ceil(sum(numels) / old)]
    layout = Layout(zero_stage, old, [f"p{i}" for i in range(5)], shapes, [0] * 5, offsets, partitions, True, 9, None)
    for key in (*KEYS, "ema"):
        for index, n in enumerate(numels):
            pieces = sorted(layout.held(key, rank, index) for rank in range(old))
            covered = [e for a, b in pieces for e in range(a, b)]
            assert covered == list(range(n)), (key, index, pieces)
            for rank in range(new):  # the new rank's ZeRO-3 / EMA slice
                size = math.ceil(n / new)
                lo, hi = min(rank * size, n), min((rank + 1) * size, n)
                if lo < hi:
                    holders = {
                        r
                        for r in range(old)
                        if max(layout.held(key, r, index)[0], lo) < min(layout.held(key, r, index)[1], hi)
                    }
                    assert set(layout.owners(key, index, lo, hi)) == holders
    for rank in range(old):
        offsets_ = layout.file_offsets(rank)
        lengths = [4 * (b - a) for key in layout.keys() for a, b in [layout.held(key, rank, i) for i in range(5)]]
        assert offsets_["end", -1] == sum(lengths)


def test_a_ray_of_our_own_trains_without_ray_trains_placement_group_cleaner(tmp_path):
    """The cleaner asks Ray's state API, which a Ray started with address="local" does not serve to
    its actors: every training's end waited 12 s for it. The local trainer drops it, and only it;
    on a cluster it stays."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train.trainer import _torch_trainer

    kw = dict(scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name="x", storage_path=str(tmp_path)))
    names = lambda trainer: [type(c).__name__ for c in trainer._create_default_callbacks()]  # noqa: E731
    ray_train = names(TorchTrainer(print, **kw))
    assert "PlacementGroupCleanerCallback" in ray_train
    assert names(_torch_trainer(local=True)(print, **kw)) == [
        n for n in ray_train if n != "PlacementGroupCleanerCallback"
    ]
    assert names(_torch_trainer(local=False)(print, **kw)) == ray_train


def test_a_damaged_shard_ends_training_at_once_and_other_failures_are_retried_as_ray_trains_default():
    """A damaged shard fails every restart the same way; Ray Train's default would restart into it
    `max_failures` times (the fault matrix's damaged-shards row trains once, not 3 times)."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.errors import DamagedShard, ShardError
    from pipeline.train.failures import DamagedShardsEndRun

    def failed(**ranks):
        return WorkerGroupError("failed", {int(r[1:]): e for r, e in ranks.items()})

    policy = DamagedShardsEndRun(FailureConfig(max_failures=2))
    # a collective torn down on the other rank does not hide the damaged shard
    damaged = failed(r0=RuntimeError("gloo: connection closed"), r1=DamagedShard("00000.tar: truncated tar"))
    assert policy.make_decision(damaged) == FailureDecision.RAISE
    # a shard the store did not serve, a killed worker: retried, max_failures times
    transient = failed(r0=ShardError("00000.tar: cannot read shard: connection reset"))
    assert [policy.make_decision(transient) for _ in range(3)] == [
        FailureDecision.RETRY,
        FailureDecision.RETRY,
        FailureDecision.RAISE,
    ]


def test_a_checkpoint_naming_a_task_where_it_lived_before_still_loads():
    """Checkpoints written before the tasks left the stage modules name them there (`task.json`)."""
    from pipeline.stages.clip_task import ClipTask
    from pipeline.stages.dvae_task import DVAETask
    from pipeline.stages.train_task import TransformerTask
    from pipeline.train.loop import MOVED_TASKS, load_task

    model = {"text_len": 8, "text_vocab": 64, "image_grid": 2, "image_vocab": 8, "layers": 1, "heads": 2}
    task = load_task("pipeline.stages.train:TransformerTask", {"model": model})
    assert type(task) is TransformerTask and task.cfg.text_len == 8
    assert type(load_task("pipeline.stages.dvae:DVAETask", {})) is DVAETask
    assert {MOVED_TASKS[old] for old in MOVED_TASKS} == {
        "pipeline.stages.dvae_task:DVAETask",
        "pipeline.stages.clip_task:ClipTask",
        "pipeline.stages.train_task:TransformerTask",
    }
    assert ClipTask.__module__ == "pipeline.stages.clip_task"
    # a path that never moved is taken as it is
    assert type(load_task("pipeline.stages.train_task:TransformerTask", {"model": model})) is TransformerTask
