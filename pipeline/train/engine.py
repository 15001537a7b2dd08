"""DeepSpeed engines from the recipe: ZeRO stage, precision, optimiser, clipping, accumulation.

On GPU the optimiser is torch's fused AdamW (one kernel over the flat partitions, and nothing to
build: DeepSpeed's own FusedAdam is compiled with nvcc on each node at the first step) and the
precision the recipe's (bf16, or fp16 with dynamic loss scaling); with the optimizer offloaded it is
DeepSpeed's CPU Adam (built once per node; torch's AdamW on the host is several times slower). On
CPU (`DS_ACCELERATOR=cpu`, gloo) it is torch's AdamW in fp32. All are the same update rule. The
recipe's raw `deepspeed` block is merged over the result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.config.models import TrainConfig


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, recursively for nested sections."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(cfg: TrainConfig, world: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for `cfg` on `world` ranks."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    zero = ds["zero_optimization"]
    if cfg.hpz_partition_size > 1:
        zero["zero_hpz_partition_size"] = cfg.hpz_partition_size
    if cfg.quantized_weights:
        zero["zero_quantized_weights"] = True
    if cfg.quantized_gradients:
        zero["zero_quantized_gradients"] = True
    if cfg.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # DeepSpeed clips at 1.0 unless told otherwise; null means no clipping
    ds["gradient_clipping"] = cfg.grad_clip if cfg.grad_clip is not None else 0.0
    if on_gpu and cfg.offload_optimizer:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay},
        }
    if on_gpu:
        if cfg.precision == "bf16":
            ds["bf16"] = {"enabled": True}
        elif cfg.precision == "fp16":
            # loss_scale 0: dynamic loss scaling (halved on overflow, the step skipped)
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return merge(ds, cfg.deepspeed)


def _deepspeed():
    """`import deepspeed`, with its shared-memory CPU all-reduce (`deepspeed_shm_comm`) switched off:
    torch.distributed's gloo all-reduce serves CPU ranks instead. DeepSpeed JIT-compiles that op into
    ~/.cache/torch_extensions at every machine's first engine under a lock file, which a rank killed
    meanwhile leaves behind, and from then on every DeepSpeed start on the machine waits for it
    forever; and each rank that uses it leaves a 69 MB /dev/shm segment nothing removes (14 GB
    after a day of test runs). On GPUs the op does not exist."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # DeepSpeed keeps this one dict
    return deepspeed


def build_model(build: Callable[[], nn.Module], cfg: TrainConfig, world: int, on_gpu: bool) -> nn.Module:
    """`build()` under `deepspeed.zero.Init` for ZeRO-3: each module's parameters are partitioned
    as soon as it is built, so a rank never holds more than its partition and one module whole
    (49 GB of fp32 per rank at 12B otherwise). Other stages build as usual. The model's blocks are
    then compiled when `cfg.compile` says so (`compile_blocks`)."""
    if cfg.zero_stage != 3:
        model = build()
    else:
        deepspeed = _deepspeed()
        ds = deepspeed_config(cfg, world, on_gpu)
        # only what partitioning reads: zero.Init checks batch sizes against a world it may not see yet
        init = {k: ds[k] for k in ("zero_optimization", "bf16", "fp16") if k in ds}
        with deepspeed.zero.Init(config_dict_or_path={**init, "train_micro_batch_size_per_gpu": cfg.batch_size}):
            model = build()
    if compiles(cfg, on_gpu):
        compile_blocks(model)
    return model


def compiles(cfg: TrainConfig, on_gpu: bool) -> bool:
    """Whether the recipe's `compile` setting compiles on this device."""
    return cfg.compile == "on" or (cfg.compile == "auto" and on_gpu)


def compile_blocks(model: nn.Module) -> int:
    """`torch.compile`s each of the model's `compile_units()` in place (lazily: the first call
    compiles); returns how many. Per block rather than the whole model: one graph serves every
    layer of a kind, and ZeRO-3's parameter hooks (kept out of the graphs by DeepSpeed) break the
    graph only between blocks' submodules, never across the model."""
    units = list(getattr(model, "compile_units", list)())
    for unit in units:
        unit.compile()
    return len(units)


def build_engine(model: nn.Module, cfg: TrainConfig, world: int, on_gpu: bool):
    """A DeepSpeed engine around `model` (torch.distributed must already be initialised)."""
    deepspeed = _deepspeed()
    ds = deepspeed_config(cfg, world, on_gpu)
    optimizer = None
    if "optimizer" not in ds:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=on_gpu or None,  # None: torch's default (foreach) on CPU
        )
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=model.parameters(), config=ds, dist_init_required=False
    )
    return engine


def loss_scale(engine) -> float | None:
    """The current fp16 loss scale, or None when the engine does not scale the loss."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def autocast_dtype(cfg: TrainConfig, on_gpu: bool) -> torch.dtype | None:
    """The dtype data is cast to before the forward (DeepSpeed casts the weights)."""
    if not on_gpu:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
