"""`pipeline.commands.plan` on a hand-built 12B DALL·E shape: ZeRO-2/3 numbers are DeepSpeed's own, the options order as
ZeRO says they should, the verdicts are right at the two ends, and activations behave as Korthikanti et al. model."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from pipeline.commands.plan import GB, USABLE_FRACTION, ModelShape, PlanRequest, activation_memory, format_plan, plan
from pipeline.commands.plan_runtime import DEEPSPEED_DEFAULTS, RuntimeRequest

LAYERS, D = 64, 3968
# 12·d² per block (attention 4d², MLP 8d²) plus the token embeddings and the two output heads.
SHAPE = ModelShape(
    params=LAYERS * 12 * D * D + 2 * (16640 + 8192) * D,
    largest_layer_params=D * 4 * D,
    layers=LAYERS,
    d_model=D,
    heads=62,
    seq_len=1280,
    text_len=256,
    text_classes=16640,
    image_classes=8192,
)


def request(**kw) -> PlanRequest:
    base = dict(gpus=64, gpu_mem_gb=80.0, micro_batch=1, zero_stage=3, checkpoint_activations=True)
    return PlanRequest(**{**base, **kw})


def options(result: dict) -> dict[tuple[int, str], dict]:
    return {(r["zero_stage"], r["offload"]): r for r in result["model_states"]}


def _ds():
    # Same guard as the module: pin DeepSpeed's CPU accelerator where there is no CUDA.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2

    return z2, z3


def test_shape_is_12b_like():
    assert 11.5e9 < SHAPE.params < 12.5e9


@pytest.mark.parametrize("gpus", [64, 512])
def test_zero2_and_zero3_rows_are_deepspeeds_estimates(gpus):
    z2, z3 = _ds()
    rows = options(plan(SHAPE, request(gpus=gpus)))
    nodes = gpus // 8
    for offload in ("none", "optimizer"):
        cpu, gpu = z2(SHAPE.params, 8, nodes, offload != "none", 1.5)
        row = rows[(2, offload)]
        assert row["source"] == "deepspeed"
        assert row["gpu_gb"] == gpu / GB and row["cpu_gb_per_node"] == cpu / GB
    for offload in ("none", "optimizer", "optimizer+params"):
        cpu, gpu, _ = z3(
            SHAPE.params, SHAPE.largest_layer_params, 8, nodes, offload != "none", offload == "optimizer+params", True
        )
        row = rows[(3, offload)]
        assert row["source"] == "deepspeed"
        assert row["gpu_gb"] == gpu / GB and row["cpu_gb_per_node"] == cpu / GB
    assert {r["source"] for r in rows.values() if r["zero_stage"] < 2} == {"formula"}


def test_table_has_every_stage_and_offload_option():
    assert set(options(plan(SHAPE, request()))) == {
        (0, "none"),
        (1, "none"),
        (1, "optimizer"),
        (2, "none"),
        (2, "optimizer"),
        (3, "none"),
        (3, "optimizer"),
        (3, "optimizer+params"),
    }


def test_zero3_per_gpu_memory_falls_with_more_gpus():
    small = options(plan(SHAPE, request(gpus=64)))[(3, "none")]["gpu_gb"]
    large = options(plan(SHAPE, request(gpus=512)))[(3, "none")]["gpu_gb"]
    assert large < small
    # Only the 18 sharded bytes per parameter shrink; the gathered largest layer stays.
    assert small - large == pytest.approx(18 * SHAPE.params * (1 / 64 - 1 / 512) / GB, rel=1e-6)


@pytest.mark.parametrize("gpus", [8, 64, 512])
def test_stages_order_and_offload_lowers_gpu_memory(gpus):
    rows = options(plan(SHAPE, request(gpus=gpus)))
    per_stage = [rows[(s, "none")]["gpu_gb"] for s in range(4)]
    assert per_stage == sorted(per_stage, reverse=True)
    assert per_stage[0] == pytest.approx(16 * SHAPE.params / GB)  # 2 + 2 + 12 bytes, nothing sharded
    for stage in (1, 2, 3):
        assert rows[(stage, "optimizer")]["gpu_gb"] < rows[(stage, "none")]["gpu_gb"]
        assert rows[(stage, "optimizer")]["cpu_gb_per_node"] > 0
    assert rows[(3, "optimizer+params")]["gpu_gb"] < rows[(3, "optimizer")]["gpu_gb"]


def test_fp32_formula_uses_four_four_eight():
    rows = options(plan(SHAPE, request(precision="fp32")))
    assert rows[(0, "none")]["gpu_gb"] == pytest.approx(16 * SHAPE.params / GB)
    assert rows[(1, "none")]["gpu_gb"] == pytest.approx((8 + 8 / 64) * SHAPE.params / GB)
    assert rows[(1, "optimizer")]["gpu_gb"] == pytest.approx(8 * SHAPE.params / GB)
    assert plan(SHAPE, request(precision="fp32"))["notes"]


def test_zero0_12b_does_not_fit_and_hint_names_a_fitting_option():
    result = plan(SHAPE, request(zero_stage=0))
    recipe = result["recipe"]
    assert recipe["model_states_gb"] > 180  # 16 bytes x 12B
    assert not recipe["fits"] and recipe["max_micro_batch"] == 0
    fitting = [r for r in result["model_states"] if r["fits"]]
    assert fitting
    assert any(f"ZeRO-{r['zero_stage']}" in recipe["hint"] for r in fitting), recipe["hint"]
    assert "DOES NOT FIT" in format_plan(result) and recipe["hint"] in format_plan(result)


RUNTIME_TERMS = ("live_params_gb", "buckets_gb", "hpz_copy_gb", "optimizer_step_gb", "ema_gb", "ema_eval_gb")


@pytest.mark.parametrize("gpus", [64, 512])
def test_zero3_12b_on_80gb_fits_with_checkpointing(gpus):
    recipe = plan(SHAPE, request(gpus=gpus))["recipe"]
    assert recipe["fits"] and "hint" not in recipe
    assert recipe["total_gb"] <= 80 * USABLE_FRACTION
    runtime = sum(recipe[k] for k in RUNTIME_TERMS)
    assert recipe["total_gb"] == pytest.approx(recipe["model_states_gb"] + recipe["activations_gb"] + runtime)
    assert recipe["max_micro_batch"] >= 1


def test_hints_fall_back_to_checkpointing_then_the_micro_batch():
    # Without checkpointing a large micro-batch cannot fit under any option; recomputation makes it fit.
    no_ckpt = plan(SHAPE, request(micro_batch=8, checkpoint_activations=False))["recipe"]
    assert not no_ckpt["fits"] and no_ckpt["hint"].startswith("turn on activation checkpointing")
    # A micro-batch far too large even with checkpointing: the hint lowers it to one that fits.
    huge = plan(SHAPE, request(micro_batch=4096))
    assert "lower the micro-batch to" in huge["recipe"]["hint"]
    batch = int(huge["recipe"]["hint"].split("lower the micro-batch to ")[1].split()[0])
    assert plan(SHAPE, request(micro_batch=batch, offload_optimizer=True, offload_params=True))["recipe"]["fits"]


def test_activations_checkpointing_saves_and_scales_linearly():
    one, four = activation_memory(SHAPE, 1, "bf16"), activation_memory(SHAPE, 4, "bf16")
    assert one["with_checkpointing_gb"] < one["without_checkpointing_gb"]
    for key in one:
        assert four[key] == pytest.approx(4 * one[key])
    # 34·s·b·h bytes per layer (Korthikanti et al., no s² attention term), 16-bit.
    assert one["without_checkpointing_gb"] == pytest.approx(LAYERS * 34 * 1280 * D / GB)
    assert activation_memory(SHAPE, 1, "fp32")["without_checkpointing_gb"] == pytest.approx(
        2 * one["without_checkpointing_gb"]
    )


def test_recipe_activations_follow_its_checkpointing_setting():
    on = plan(SHAPE, request(checkpoint_activations=True))
    off = plan(SHAPE, request(checkpoint_activations=False))
    acts = on["activations"]
    assert on["recipe"]["activations_gb"] == pytest.approx(acts["with_checkpointing_gb"] + acts["logits_gb"])
    assert off["recipe"]["activations_gb"] == pytest.approx(acts["without_checkpointing_gb"] + acts["logits_gb"])


def test_format_plan_and_json():
    result = plan(SHAPE, request(zero_stage=2, offload_optimizer=True))
    assert json.loads(json.dumps(result))["params"] == SHAPE.params
    text = format_plan(result)
    assert f"{SHAPE.params:,}" in text
    lines = text.splitlines()
    for row in result["model_states"]:
        assert any(
            line.split()[:2] in ([str(row["zero_stage"]), row["offload"]], ["*", str(row["zero_stage"])])
            and row["offload"] in line.split()
            and f"{row['gpu_gb']:.1f}" in line.split()
            for line in lines
        ), row
    starred = [line for line in lines if line.startswith("*")]
    assert len(starred) == 1 and starred[0].split()[1:3] == ["2", "optimizer"]
    assert "90%" in text


def test_impossible_requests_are_refused():
    with pytest.raises(ValueError, match="offload"):
        request(zero_stage=2, offload_optimizer=True, offload_params=True)
    with pytest.raises(ValueError, match="offload"):
        request(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="nodes"):
        request(gpus=12)
    with pytest.raises(ValueError, match="precision"):
        request(precision="fp8")
    with pytest.raises(ValueError):
        dataclasses.replace(SHAPE, text_len=SHAPE.seq_len)
    # A single node smaller than 8 GPUs is fine: gpus_per_node caps at gpus.
    assert plan(SHAPE, request(gpus=4))["gpus_per_node"] == 4


def test_runtime_terms_and_step_time_of_zero3_at_512_gpus():
    """ZeRO-3 moves 3 x 2 bytes per parameter per micro-batch; at 400 Gbps per 8-GPU node that is
    ~12 s against ~1.8 s of compute, and the advice (ZeRO++) brings it to 1.5 bytes per parameter."""
    run = RuntimeRequest(steps=430_000, host_mem_gb=1100)
    result = plan(SHAPE, request(gpus=512, micro_batch=2), run)
    step, recipe = result["step"], result["recipe"]
    assert result["comm_gb_per_step"] == pytest.approx(6 * SHAPE.params / GB)
    assert step["comm_seconds"] == pytest.approx(6 * SHAPE.params / (400e9 / 8 / 8))
    assert step["compute_seconds"] == pytest.approx(8 * SHAPE.params * 2 * 1280 / (312e12 * 0.45))
    assert result["step_seconds"] == step["comm_seconds"] and 10 < step["comm_seconds"] < 13
    assert "hpz_partition_size=8" in recipe["advice"]
    assert recipe["ema_gb"] == pytest.approx(4 * SHAPE.params / 512 / GB) and recipe["hpz_copy_gb"] == 0
    # DeepSpeed keeps up to 1e9 gathered parameters live; the reduce bucket and its reduce-scatter copy
    assert recipe["live_params_gb"] == pytest.approx(1e9 * 2 / GB)
    assert recipe["buckets_gb"] == pytest.approx((5e7 + 2 * 5e8) * 2 / GB)
    assert recipe["optimizer_step_gb"] == pytest.approx(4 * SHAPE.params / 512 / GB)
    runtime = sum(recipe[k] for k in RUNTIME_TERMS)
    assert (
        result["gpu_peak_gb"]
        == recipe["total_gb"]
        == pytest.approx(recipe["model_states_gb"] + recipe["activations_gb"] + runtime)
    )
    zero_pp = RuntimeRequest(steps=430_000, hpz_partition_size=8, quantized_weights=True, quantized_gradients=True)
    after = plan(SHAPE, request(gpus=512, micro_batch=2), zero_pp)
    assert after["comm_gb_per_step"] == pytest.approx(1.5 * SHAPE.params / GB)
    assert after["recipe"]["hpz_copy_gb"] == pytest.approx(2 * SHAPE.params / 8 / GB)
    assert after["step_seconds"] < result["step_seconds"] / 3


def test_host_memory_per_node_counts_the_build_the_save_and_the_export():
    zero3 = plan(SHAPE, request(gpus=64), RuntimeRequest(host_mem_gb=128, loader_workers=4))
    host = zero3["host"]
    assert host["build_gb"] == pytest.approx(4 * SHAPE.largest_layer_params / GB)  # zero.Init: one layer
    assert host["per_rank_gb"] == pytest.approx(3.0 + 2.0 + max(host["build_gb"], host["checkpoint_save_gb"]))
    assert zero3["host_peak_gb_per_node"] == pytest.approx(8 * host["per_rank_gb"] + host["rank0_export_gb"])
    assert zero3["recipe"]["host_fits"] and zero3["recipe"]["fits"]
    zero2 = plan(SHAPE, request(gpus=64, zero_stage=2), RuntimeRequest(host_mem_gb=64))
    assert zero2["host"]["build_gb"] == pytest.approx(4 * SHAPE.params / GB)  # the whole fp32 model per rank
    assert not zero2["recipe"]["host_fits"] and not zero2["recipe"]["fits"] and "host_hint" in zero2["recipe"]


def test_the_plans_zero_defaults_are_deepspeeds():
    """The settings the bucket terms read fall back to what DeepSpeed itself defaults to, stage by stage."""
    _ds()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for stage in (1, 2, 3):
        cfg = DeepSpeedZeroConfig(stage=stage)
        assert cfg.reduce_bucket_size == DEEPSPEED_DEFAULTS["reduce_bucket_size"]
        assert cfg.prefetch_bucket_size == DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"]
        assert cfg.max_live_parameters == DEEPSPEED_DEFAULTS["stage3_max_live_parameters"]
        # `reduce_elements` assumes contiguous gradients and reduce-scatter, overlap_comm only under ZeRO-3
        assert cfg.contiguous_gradients and cfg.reduce_scatter and cfg.overlap_comm == (stage == 3)


@pytest.mark.parametrize("gpus", [1, 2, 64])
def test_reduce_buckets_follow_what_deepspeed_allocates(gpus):
    """ZeRO-3 allocates a `reduce_bucket_size` buffer (reserved whole on a GPU, resident only as far as the
    gradients fill it on CPU) and reduce_scatter_coalesced's flat copy of a bucket, on any world size;
    ZeRO-1/2 the buffer alone, twice with overlap_comm. In elements, bf16."""
    small = dataclasses.replace(SHAPE, params=10**8, largest_layer_params=10**7)  # below the 5e8 default bucket
    prefetch = DEEPSPEED_DEFAULTS["stage3_prefetch_bucket_size"]

    def elements(shape, stage=3, accelerator="cuda", **zero):
        run = RuntimeRequest(accelerator=accelerator, deepspeed={"zero_optimization": zero})
        return plan(shape, request(gpus=gpus, zero_stage=stage), run)["recipe"]["buckets_gb"] * GB / 2

    assert elements(small) == pytest.approx(prefetch + 5e8 + 1e8)  # the whole buffer, the model's gradients copied
    assert elements(small, accelerator="cpu") == pytest.approx(prefetch + 1e8 + 1e8)  # the buffer as far as filled
    assert elements(SHAPE) == elements(SHAPE, accelerator="cpu") == pytest.approx(prefetch + 2 * 5e8)
    # a parameter larger than the bucket rides alone: the copy is its size
    assert elements(SHAPE, reduce_bucket_size=1e6) == pytest.approx(prefetch + 1e6 + SHAPE.largest_layer_params)
    assert elements(SHAPE, contiguous_gradients=False) == pytest.approx(prefetch + 5e8)
    assert elements(SHAPE, stage=2) == pytest.approx(5e8)
    assert elements(SHAPE, stage=2, overlap_comm=True) == pytest.approx(2 * 5e8)
    assert elements(small, stage=1, accelerator="cpu") == pytest.approx(1e8)
    with pytest.raises(ValueError, match="accelerator"):
        RuntimeRequest(accelerator="tpu")
