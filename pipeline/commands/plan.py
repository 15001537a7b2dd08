"""`dalle plan`: will a transformer training recipe fit the cluster, and how long will a step take? Answered
before anything is launched.

Per GPU it estimates the model states (parameters, gradients, optimizer states) under every ZeRO stage and
offload choice, the activations at the recipe's micro-batch with and without activation checkpointing, and the
output logits, then says whether the recipe's own choice fits and, when it does not, what would.

ZeRO-2 and ZeRO-3 figures come from DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`), so they move with the DeepSpeed
release the trainer runs on. DeepSpeed has none for ZeRO-0/1; those use the ZeRO paper's (Rajbhandari et al. 2020)
mixed-precision Adam accounting: 2 bytes of 16-bit weights, 2 of 16-bit gradients and 12 of fp32 optimizer states
(master weights, momentum, variance) per parameter. DeepSpeed's estimators always assume mixed precision; for an
fp32 recipe the formula rows use 4 + 4 + 8 (weights, gradients, Adam m and v; no master copy) while the ZeRO-2/3
rows stay DeepSpeed's mixed-precision numbers and so read low. Activations follow Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models". The rest of a rank's memory (ZeRO-3's live
parameters and buckets, ZeRO++'s secondary copy, the EMA and its evaluation), each node's host memory (build,
checkpoint save, rank 0's export) and the step-time model are `plan_runtime`'s. All sizes are GB = 1024**3 bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from pipeline.commands.plan_runtime import RuntimeRequest, advice, gpu_terms, host_terms, step_time
from pipeline.config.recipe import Recipe
from pipeline.errors import InputError
from pipeline.models.transformer import DalleConfig, largest_layer_params, param_count
from pipeline.stages.train_task import recipe_model_config

GB = 1024**3
# Share of a GPU's memory the plan lets itself use: the CUDA context, NCCL buffers and allocator fragmentation
# take the rest, and they are not modelled.
USABLE_FRACTION = 0.9
# DeepSpeed's default `additional_buffer_factor`; its estimators apply it to host memory only, and so do the
# formula rows, so the CPU column is comparable across stages.
BUFFER_FACTOR = 1.5
# Korthikanti et al.'s 34·s·b·h bytes per layer for 16-bit activations. Their 5·a·s²·b term for the attention
# scores is left out: FlexAttention / flash-style kernels never materialise the s×s score matrix.
ACT_BYTES_PER_TOKEN_DIM = 34
PRECISIONS = ("bf16", "fp16", "fp32")
# Stage -> offload choices DeepSpeed offers: no offload for ZeRO-0, parameter offload only with ZeRO-3.
OFFLOADS = {
    0: ("none",),
    1: ("none", "optimizer"),
    2: ("none", "optimizer"),
    3: ("none", "optimizer", "optimizer+params"),
}


@dataclass(frozen=True)
class ModelShape:
    params: int  # total parameters
    largest_layer_params: int  # biggest single parameter tensor (for ZeRO-3's estimator)
    layers: int
    d_model: int
    heads: int
    seq_len: int  # tokens per sample (e.g. 1280 = 256 text + 1024 image)
    text_len: int  # text positions
    text_classes: int  # text head outputs (e.g. 16384 + 256)
    image_classes: int  # image head outputs (e.g. 8192)

    def __post_init__(self) -> None:
        for name in ("params", "largest_layer_params", "layers", "d_model", "heads", "seq_len", "text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model shape: {name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.text_len < self.seq_len:
            raise ValueError(f"model shape: text_len {self.text_len} must be below seq_len {self.seq_len}")

    @classmethod
    def of(cls, cfg: DalleConfig) -> ModelShape:
        """The shape of the transformer `cfg` describes."""
        return cls(
            params=param_count(cfg),
            largest_layer_params=largest_layer_params(cfg),
            layers=cfg.layers,
            d_model=cfg.d_model,
            heads=cfg.heads,
            seq_len=cfg.seq_len,
            text_len=cfg.text_len,
            text_classes=cfg.text_vocab + cfg.text_len,
            image_classes=cfg.image_vocab,
        )


# kw_only: nine similar-looking fields are too easy to swap positionally, and it lets the recipe's choices default.
@dataclass(frozen=True, kw_only=True)
class PlanRequest:
    gpus: int  # total GPUs (data-parallel ranks)
    gpu_mem_gb: float
    micro_batch: int
    gpus_per_node: int = 8  # capped at `gpus` for a single small node
    precision: str = "bf16"  # "bf16" | "fp16" | "fp32"
    zero_stage: int = 0  # the recipe's choice, 0..3
    offload_optimizer: bool = False  # the recipe's choice
    offload_params: bool = False  # the recipe's choice (ZeRO-3 only)
    checkpoint_activations: bool = False  # the recipe's choice
    # The trainer builds ZeRO-3 models under `deepspeed.zero.Init` (a rank never holds the whole model); this only
    # changes ZeRO-3's CPU column.
    zero_init: bool = True

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1 or self.micro_batch < 1 or self.gpu_mem_gb <= 0:
            raise ValueError("plan: gpus, gpus_per_node, micro_batch and gpu_mem_gb must be positive")
        if self.gpus % self.per_node:
            raise ValueError(f"plan: {self.gpus} GPUs do not split into nodes of {self.per_node}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"plan: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.offload not in OFFLOADS.get(self.zero_stage, ()):
            allowed = ", ".join(OFFLOADS.get(self.zero_stage, ("zero_stage must be 0..3",)))
            raise ValueError(f"plan: ZeRO-{self.zero_stage} offload {self.offload!r} not available ({allowed})")

    @property
    def per_node(self) -> int:
        return min(self.gpus_per_node, self.gpus)

    @property
    def offload(self) -> str:
        if self.offload_params:
            # DeepSpeed's estimator only knows parameter offload on top of optimizer offload.
            return "optimizer+params" if self.offload_optimizer else "params"
        return "optimizer" if self.offload_optimizer else "none"


def _deepspeed_states(shape: ModelShape, req: PlanRequest, stage: int, offload: str) -> tuple[int, int]:
    """(gpu_bytes, cpu_bytes_per_node) from DeepSpeed's estimator for ZeRO-2 or ZeRO-3."""
    # Imported here: deepspeed takes seconds to import and probes for an accelerator. The estimators are plain
    # arithmetic, so where CUDA is absent pin the CPU accelerator instead of letting detection guess.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    common = {
        "num_gpus_per_node": req.per_node,
        "num_nodes": req.gpus // req.per_node,
        "cpu_offload": offload != "none",
        "additional_buffer_factor": BUFFER_FACTOR,
    }
    if stage == 2:
        # Reported as DeepSpeed gives it, although its offloaded host figure (max(4 x total GPUs, 16) bytes per
        # parameter per node) grows with the cluster size rather than the node's share.
        cpu, gpu = estimate_zero2_model_states_mem_needs(shape.params, **common)
    else:
        cpu, gpu, _largest = estimate_zero3_model_states_mem_needs(
            shape.params,
            shape.largest_layer_params,
            cpu_offload_params=offload == "optimizer+params",
            zero_init=req.zero_init,
            **common,
        )
    if req.precision == "fp32" and not (stage == 3 and offload == "optimizer+params"):
        # the estimators count 16-bit weights (2 bytes); an fp32 run keeps them in 4
        gpu += 2 * shape.params // (req.gpus if stage == 3 else 1)
    return gpu, cpu


def _formula_states(shape: ModelShape, req: PlanRequest, stage: int, offload: str) -> tuple[int, int]:
    """(gpu_bytes, cpu_bytes_per_node) for ZeRO-0/1 from the ZeRO paper's per-parameter byte counts."""
    weights, grads, optim = (4, 4, 8) if req.precision == "fp32" else (2, 2, 12)
    optim_per_rank = optim if stage == 0 else optim / req.gpus  # ZeRO-1 shards only the optimizer states
    on_gpu = weights + grads + (0 if offload == "optimizer" else optim_per_rank)
    # Every rank first materialises the fp32 model on the host (DeepSpeed's estimators count this too); with
    # offload the node's ranks also keep their optimizer shards there, whichever is larger at the peak.
    host = max(4.0, optim_per_rank if offload == "optimizer" else 0.0) * req.per_node
    return int(on_gpu * shape.params), int(host * shape.params * BUFFER_FACTOR)


def model_state_options(shape: ModelShape, req: PlanRequest) -> list[dict]:
    """One row per (ZeRO stage, offload) DeepSpeed supports, per-GPU and per-node memory of the model states."""
    rows = []
    for stage, offloads in OFFLOADS.items():
        for offload in offloads:
            estimate = _deepspeed_states if stage >= 2 else _formula_states
            gpu, cpu = estimate(shape, req, stage, offload)
            rows.append(
                {
                    "zero_stage": stage,
                    "offload": offload,
                    "gpu_gb": gpu / GB,
                    "cpu_gb_per_node": cpu / GB,
                    "source": "deepspeed" if stage >= 2 else "formula",
                }
            )
    return rows


def activation_memory(shape: ModelShape, micro_batch: int, precision: str) -> dict:
    """Per-GPU activation and logit memory at `micro_batch`, in GB."""
    scale = 2 if precision == "fp32" else 1
    tokens_dim = shape.seq_len * micro_batch * shape.d_model
    one_layer = ACT_BYTES_PER_TOKEN_DIM * tokens_dim * scale
    # Checkpointing keeps each block's 16-bit input and recomputes one block at a time in the backward pass.
    checkpointed = shape.layers * 2 * tokens_dim * scale + one_layer
    # The loss reads logits in fp32: the 16-bit head output plus its fp32 copy (fp32 runs: output plus log-softmax).
    logit_bytes = 2 * scale + 4
    predicted = (shape.text_len - 1) * shape.text_classes + (shape.seq_len - shape.text_len) * shape.image_classes
    return {
        "without_checkpointing_gb": shape.layers * one_layer / GB,
        "with_checkpointing_gb": checkpointed / GB,
        "logits_gb": micro_batch * predicted * logit_bytes / GB,
    }


def _activations_gb(acts: dict, checkpointing: bool) -> float:
    key = "with_checkpointing_gb" if checkpointing else "without_checkpointing_gb"
    return acts[key] + acts["logits_gb"]


def _label(row: dict) -> str:
    return f"ZeRO-{row['zero_stage']}" + ("" if row["offload"] == "none" else f" + {row['offload']} offload")


def _hint(rows: list[dict], chosen: dict, acts: dict, per_sample: dict, usable: float, req: PlanRequest) -> str:
    """The least disruptive change that fits: another ZeRO/offload option, then checkpointing, then the batch."""
    # Offloading costs far more step time than ZeRO-3's extra all-gathers, so try every stage before any offload.
    ordered = sorted(rows, key=lambda r: (r["offload"] != "none", r["offload"] == "optimizer+params", r["zero_stage"]))
    for row in ordered:
        total = row["gpu_gb"] + row["runtime_gb"] + _activations_gb(acts, req.checkpoint_activations)
        if total <= usable:
            return f"use {_label(row)} ({total:.1f} GB per GPU)"
    if not req.checkpoint_activations:
        # Keeping the recipe's ZeRO choice and recomputing activations is the smaller change, so say that first.
        for row in [chosen, *ordered]:
            total = row["gpu_gb"] + row["runtime_gb"] + _activations_gb(acts, True)
            if total <= usable:
                where = "" if row is chosen else f" and use {_label(row)}"
                return f"turn on activation checkpointing{where} ({total:.1f} GB per GPU)"
    leanest = min(rows, key=lambda r: r["gpu_gb"] + r["runtime_gb"])
    batch = int((usable - leanest["gpu_gb"] - leanest["runtime_gb"]) // _activations_gb(per_sample, True))
    if batch >= 1:
        return f"lower the micro-batch to {batch} with {_label(leanest)} and activation checkpointing"
    return "does not fit even at micro-batch 1 with every offload and checkpointing: add GPUs or shrink the model"


def plan(shape: ModelShape, req: PlanRequest, run: RuntimeRequest | None = None) -> dict:
    """The full estimate as a JSON-able dict; see the module docstring for where each number comes from."""
    run = run or RuntimeRequest()
    usable = req.gpu_mem_gb * USABLE_FRACTION
    rows = model_state_options(shape, req)
    acts = activation_memory(shape, req.micro_batch, req.precision)
    per_sample = activation_memory(shape, 1, req.precision)
    recipe_acts = _activations_gb(acts, req.checkpoint_activations)
    for row in rows:  # what each option would total with the recipe's micro-batch and checkpointing
        stage = replace(req, zero_stage=row["zero_stage"], offload_optimizer=False, offload_params=False)
        row["runtime_gb"] = sum(gpu_terms(shape, stage, run).values())
        row["total_gb"] = row["gpu_gb"] + row["runtime_gb"] + recipe_acts
        row["fits"] = row["total_gb"] <= usable
    chosen = next(r for r in rows if (r["zero_stage"], r["offload"]) == (req.zero_stage, req.offload))
    # Activations grow linearly with the micro-batch, so the largest that fits is a division.
    headroom = usable - chosen["gpu_gb"] - chosen["runtime_gb"]
    max_batch = max(0, int(headroom // _activations_gb(per_sample, req.checkpoint_activations)))
    extra = gpu_terms(shape, req, run)
    gpu_peak = chosen["total_gb"]
    offloaded = chosen["cpu_gb_per_node"] if req.offload != "none" else 0.0
    host = host_terms(shape, req, run, offloaded)
    timing = step_time(shape, req, run, req.checkpoint_activations)
    host_fits = run.host_mem_gb is None or host["per_node_gb"] <= run.host_mem_gb
    recipe = {
        "zero_stage": req.zero_stage,
        "offload": req.offload,
        "checkpoint_activations": req.checkpoint_activations,
        "model_states_gb": chosen["gpu_gb"],
        "activations_gb": recipe_acts,
        "total_gb": chosen["total_gb"],
        **extra,
        "gpu_peak_gb": gpu_peak,
        "fits": chosen["fits"] and host_fits,
        "gpu_fits": chosen["fits"],
        "host_fits": host_fits,
        "max_micro_batch": max_batch,
    }
    if not chosen["fits"]:
        recipe["hint"] = _hint(rows, chosen, acts, per_sample, usable, req)
    if not host_fits:
        recipe["host_hint"] = (
            f"{host['per_node_gb']:.0f} GB of host memory per node against {run.host_mem_gb:g} GB: "
            "fewer loader workers, or no offload"
        )
    advised = advice(shape, req, run, timing, req.checkpoint_activations)
    if advised:
        recipe["advice"] = advised
    notes = []
    if req.precision == "fp32":
        notes.append("DeepSpeed's ZeRO-2/3 estimators assume mixed precision; for fp32 those rows read low")
    return {
        "params": shape.params,
        "gpu_peak_gb": gpu_peak,
        "host_peak_gb_per_node": host["per_node_gb"],
        "host_gb_per_rank": host["per_rank_gb"],
        "step_seconds": timing["step_seconds"],
        "comm_gb_per_step": timing["comm_gb_per_step"],
        "host": host,
        "step": timing,
        "assumptions": {
            "net_gbps": run.net_gbps,
            "gpu_tflops": run.gpu_tflops,
            "mfu": run.mfu,
            "host_mem_gb": run.host_mem_gb,
        },
        "gpus": req.gpus,
        "gpus_per_node": req.per_node,
        "gpu_mem_gb": req.gpu_mem_gb,
        "usable_fraction": USABLE_FRACTION,
        "usable_gb": usable,
        "micro_batch": req.micro_batch,
        "precision": req.precision,
        "model_states": rows,
        "activations": acts,
        "recipe": recipe,
        "notes": notes,
    }


def _short(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(result: dict) -> str:
    """A plain-text report: a header, the option table (recipe's row starred) and the verdict."""
    recipe = result["recipe"]
    lines = [
        f"parameters   {result['params']:,} ({_short(result['params'])})",
        f"cluster      {result['gpus']} GPUs x {result['gpu_mem_gb']:g} GB ({result['gpus_per_node']} per node);"
        f" plan uses {result['usable_fraction']:.0%} = {result['usable_gb']:.1f} GB per GPU",
        f"micro-batch  {result['micro_batch']} per GPU, {result['precision']}",
        "",
    ]
    header = ("", "ZeRO", "offload", "states GB/GPU", "CPU GB/node", "total GB/GPU", "fits", "source")
    table = [header]
    for row in result["model_states"]:
        star = "*" if (row["zero_stage"], row["offload"]) == (recipe["zero_stage"], recipe["offload"]) else ""
        sizes = [f"{row[k]:.1f}" for k in ("gpu_gb", "cpu_gb_per_node", "total_gb")]
        fits = "yes" if row["fits"] else "no"
        table.append((star, str(row["zero_stage"]), row["offload"], *sizes, fits, row["source"]))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    numeric = {3, 4, 5}  # right-align numbers so the decimal points line up
    for r in table:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    acts = result["activations"]
    ckpt = "on" if recipe["checkpoint_activations"] else "off"
    lines += [
        f"(total = states + runtime terms + activations at the recipe's micro-batch, checkpointing {ckpt};"
        " * = the recipe)",
        "",
        f"activations  {acts['without_checkpointing_gb']:.2f} GB without checkpointing,"
        f" {acts['with_checkpointing_gb']:.2f} GB with; logits {acts['logits_gb']:.2f} GB",
        f"recipe       {'ZeRO-' + str(recipe['zero_stage'])}, offload {recipe['offload']}, checkpointing {ckpt}:"
        f" states {recipe['model_states_gb']:.1f} + activations {recipe['activations_gb']:.1f}"
        f" (largest micro-batch {recipe['max_micro_batch']})",
        f"runtime      live parameters {recipe['live_params_gb']:.1f} + buckets {recipe['buckets_gb']:.1f}"
        f" + hpZ copy {recipe['hpz_copy_gb']:.1f} + optimizer step {recipe['optimizer_step_gb']:.2f}"
        f" + EMA {recipe['ema_gb']:.2f} + EMA evaluation"
        f" {recipe['ema_eval_gb']:.2f} -> {result['gpu_peak_gb']:.1f} GB peak per GPU"
        f" -> {'fits' if recipe['gpu_fits'] else 'DOES NOT FIT'}",
    ]
    host, step, assumed = result["host"], result["step"], result["assumptions"]
    against = "" if assumed["host_mem_gb"] is None else f" of {assumed['host_mem_gb']:g} GB"
    lines += [
        f"host/rank    process {host['process_gb']:.1f} + max(build {host['build_gb']:.1f},"
        f" checkpoint save {host['checkpoint_save_gb']:.1f}) = {host['per_rank_gb']:.1f} GB",
        f"host/node    {result['gpus_per_node']} ranks + rank 0's export {host['rank0_export_gb']:.1f}"
        f" + offloaded {host['offloaded_gb_per_node']:.1f} = {host['per_node_gb']:.1f} GB{against}"
        f" -> {'fits' if recipe['host_fits'] else 'DOES NOT FIT'}",
        f"step         compute {step['compute_seconds']:.2f} s ({assumed['gpu_tflops']:g} TFLOPS at"
        f" {assumed['mfu']:.0%} MFU), ZeRO traffic {step['comm_gb_per_step']:.1f} GB/GPU = {step['comm_seconds']:.2f} s"
        f" at {assumed['net_gbps']:g} Gbps/node -> {step['step_seconds']:.2f} s per step"
        + (f", {step['run_days']:.1f} days for the run" if step["run_days"] else ""),
    ]
    for key in ("hint", "host_hint", "advice"):
        if key in recipe:
            lines.append(f"{key.replace('_', ' '):<12} {recipe[key]}")
    lines += [f"note         {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def plan_inputs(
    recipe: Recipe, gpus: int, gpu_mem_gb: float, gpus_per_node: int, **cluster: float | None
) -> tuple[ModelShape, PlanRequest, RuntimeRequest]:
    """The model shape and requests of a recipe's transformer training; `cluster` holds the
    `RuntimeRequest` settings given on the command line (host_mem_gb, net_gbps, gpu_tflops, mfu)."""
    cfg, train = recipe_model_config(recipe), recipe.transformer.train
    shape = ModelShape.of(cfg)
    try:
        request = PlanRequest(
            gpus=gpus,
            gpu_mem_gb=gpu_mem_gb,
            micro_batch=train.batch_size,
            gpus_per_node=gpus_per_node,
            precision=train.precision,
            zero_stage=train.zero_stage,
            offload_optimizer=train.offload_optimizer,
            offload_params=train.offload_params,
            checkpoint_activations=cfg.checkpoint_activations,
        )
        runtime = RuntimeRequest(
            grad_accum=train.grad_accum,
            ema=train.ema_decay is not None,
            loader_workers=train.loader_workers,
            hpz_partition_size=train.hpz_partition_size,
            quantized_weights=train.quantized_weights,
            quantized_gradients=train.quantized_gradients,
            deepspeed=train.deepspeed,
            steps=train.steps,
            **{k: v for k, v in cluster.items() if v is not None},
        )
    except ValueError as err:
        raise InputError(str(err)) from None
    return shape, request, runtime
