"""What `dalle plan` adds to the model states and activations: the rest of a rank's memory while it
builds, trains, evaluates, checkpoints and exports, the host memory of a node, and a step-time model.

Per GPU, beyond `plan.plan`'s states and activations (P parameters, w bytes per 16-bit value, N GPUs,
n per node):
- ZeRO-3 live parameters: DeepSpeed keeps gathered parameters alive up to
  `stage3_max_live_parameters` (1e9 by default: a model below it stays whole in the forward after
  the first step), and at least a block (12·d²), x w; plus the prefetch bucket
  (`stage3_prefetch_bucket_size`), at DeepSpeed's defaults unless the recipe's `deepspeed` block
  sets them;
- the gradient reduction, as DeepSpeed 0.19 allocates it (B = `reduce_bucket_size`, 5e8 by default):
  ZeRO-3 (`stage3.py`) makes one contiguous buffer of B elements (`contiguous_gradients`, on by
  default) and, on any world size, `reduce_scatter_coalesced` copies the bucket's gradients into an
  interleaved flat buffer: as many elements as the bucket holds, B or less, never more than P nor
  fewer than the largest parameter (which rides alone in a bucket it overflows); ZeRO-1/2
  (`stage_1_and_2.py` `setup_buckets`) make the B-element buffer, a second with `overlap_comm`
  (off by default below ZeRO-3), and reduce in place (without `contiguous_gradients`, no buffer
  but the flattened copy of a bucket). On a GPU the caching allocator reserves the whole
  buffer; on CPU ranks (`accelerator="cpu"`, the benchmark) a page counts only once written, so
  the buffer counts as far as it fills, min(B, P): at DeepSpeed's default B a model under 5e8
  parameters has most of its buffer reserved on a GPU but never resident on a CPU;
- the optimizer step's temporaries: torch's multi-tensor AdamW makes a float32 intermediate the
  size of the rank's optimizer partition (4·P/N under ZeRO 1-3);
- ZeRO++ hpZ: a second copy of the 16-bit weights sharded within `hpz_partition_size` GPUs (w·P/hpz);
- the EMA's float32 slices (4·P/N) and, while it is evaluated, the engine's own partition kept aside
  (w·P/N).

Per node host memory: every rank's process (a fixed `PROCESS_GB` for the CUDA context, torch, Ray's
worker and the loader, plus `LOADER_WORKER_GB` per loader process), the larger of its build peak
(under `deepspeed.zero.Init` one layer in fp32; without, the whole fp32 model) and its checkpoint
save (its partitions of the fp32 master weights, Adam moments, 16-bit weights and EMA staged on the
host), offloaded states (DeepSpeed's CPU column), and rank 0's export (two shards of the streamed
safetensors and the largest parameter in fp32).

Step time: compute is 6·P FLOPs per token (8·P with activation checkpointing's recomputed forward)
at `--gpu-tflops` x `--mfu`; ZeRO traffic per GPU per update is, for ZeRO-3, an all-gather of the
16-bit weights in the forward and again in the backward and a reduce-scatter of the gradients, per
micro-batch (3·w·P), for ZeRO 0-2 one all-reduce of the gradients per update (2·w·P). ZeRO++ cuts
the cross-node part: hpZ keeps the backward all-gather inside the node, qwZ sends int8 weights,
qgZ int4 gradients (Wang et al. 2023). It crosses the network at `--net-gbps` per node shared by the
node's GPUs (NVLink at `NVLINK_GBPS` when the job fits one node). With DeepSpeed's prefetching
overlapping the two, a step takes the longer of them.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3
PROCESS_GB = 3.0
LOADER_WORKER_GB = 0.5
NVLINK_GBPS = 2400.0  # NVLink 3/4 within a node, per GPU (300 GB/s)
EXPORT_SHARD_BYTES = 2 * GB  # `pipeline.models.weight_files.ShardedWriter`'s default
DEEPSPEED_DEFAULTS = {"stage3_prefetch_bucket_size": 5e7, "reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9}


@dataclass(frozen=True, kw_only=True)
class RuntimeRequest:
    """What `plan.PlanRequest` does not say: the run's other settings and the cluster's speed."""

    grad_accum: int = 1
    ema: bool = True
    loader_workers: int = 0
    hpz_partition_size: int = 1
    quantized_weights: bool = False
    quantized_gradients: bool = False
    deepspeed: dict | None = None
    host_mem_gb: float | None = None
    net_gbps: float = 400.0
    gpu_tflops: float = 312.0  # A100 bf16 dense; H100 SXM: 989
    mfu: float = 0.45
    steps: int = 0
    # "cpu" for ranks on DeepSpeed's CPU accelerator (the benchmark, the demo): their device memory is host
    # memory, resident only where written, which changes what an allocated but unfilled buffer costs.
    accelerator: str = "cuda"

    def __post_init__(self) -> None:
        if self.net_gbps <= 0 or self.gpu_tflops <= 0 or not 0 < self.mfu <= 1:
            raise ValueError("plan: --net-gbps and --gpu-tflops must be positive and --mfu in (0, 1]")
        if self.accelerator not in ("cuda", "cpu"):
            raise ValueError(f"plan: accelerator must be 'cuda' or 'cpu', got {self.accelerator!r}")
        if self.host_mem_gb is not None and self.host_mem_gb <= 0:
            raise ValueError("plan: --host-mem must be positive")


def _zero_setting(run: RuntimeRequest, key: str) -> float:
    zero = (run.deepspeed or {}).get("zero_optimization", {})
    return float(zero.get(key, DEEPSPEED_DEFAULTS[key]))


def reduce_elements(shape, req, run: RuntimeRequest) -> float:
    """Gradient elements the reduction holds at once beside the model states (see the module docstring)."""
    if req.zero_stage == 0:
        return 0.0
    zero = (run.deepspeed or {}).get("zero_optimization", {})
    bucket = _zero_setting(run, "reduce_bucket_size")
    buffer = min(bucket, shape.params) if run.accelerator == "cpu" else bucket
    contiguous = zero.get("contiguous_gradients", True)
    # A bucket is flushed before a parameter would overflow it, so it holds at most B elements, or one larger
    # parameter on its own.
    copy = min(shape.params, max(bucket, shape.largest_layer_params))
    if req.zero_stage < 3:
        # ZeRO-1/2 reduce the contiguous buffer in place; without it each bucket is flattened into a copy.
        return (2 if zero.get("overlap_comm", False) else 1) * buffer if contiguous else copy
    return (buffer if contiguous else 0.0) + copy


def gpu_terms(shape, req, run: RuntimeRequest) -> dict[str, float]:
    """GB per GPU beyond the model states and activations."""
    w = 4 if req.precision == "fp32" else 2
    p, n = shape.params, req.gpus
    terms = {"live_params_gb": 0.0, "buckets_gb": 0.0, "hpz_copy_gb": 0.0}
    if req.zero_stage == 3:
        live = max(12 * shape.d_model**2, min(p, _zero_setting(run, "stage3_max_live_parameters")))
        terms["live_params_gb"] = live * w / GB
        terms["buckets_gb"] = (_zero_setting(run, "stage3_prefetch_bucket_size") * w) / GB
        terms["hpz_copy_gb"] = (w * p / run.hpz_partition_size / GB) if run.hpz_partition_size > 1 else 0.0
    terms["buckets_gb"] += reduce_elements(shape, req, run) * w / GB
    terms["optimizer_step_gb"] = 4 * p / (n if req.zero_stage >= 1 else 1) / GB
    terms["ema_gb"] = 4 * p / n / GB if run.ema else 0.0
    terms["ema_eval_gb"] = w * p / n / GB if run.ema else 0.0
    return terms


def host_terms(shape, req, run: RuntimeRequest, offload_cpu_gb_per_node: float) -> dict[str, float]:
    """GB of host memory per rank and per node."""
    w = 4 if req.precision == "fp32" else 2
    p, n = shape.params, req.gpus
    zero_init = req.zero_stage == 3
    build = (4 * shape.largest_layer_params if zero_init else 4 * p) / GB
    # ZeRO 1-3 save each rank's optimizer partitions (fp32 master + two Adam moments) and its share
    # of the 16-bit weights (ZeRO 0-2: rank 0 writes the whole module), staged on the host
    optim = 12 * p / (n if req.zero_stage >= 1 else 1)
    weights = w * p / (n if req.zero_stage == 3 else 1)
    save = (optim + weights + (4 * p / n if run.ema else 0)) / GB
    process = PROCESS_GB + LOADER_WORKER_GB * run.loader_workers
    export = (2 * EXPORT_SHARD_BYTES + 4 * shape.largest_layer_params) / GB
    per_rank = process + max(build, save)
    per_node = req.per_node * per_rank + export + offload_cpu_gb_per_node
    return {
        "process_gb": process,
        "build_gb": build,
        "checkpoint_save_gb": save,
        "rank0_export_gb": export,
        "offloaded_gb_per_node": offload_cpu_gb_per_node,
        "per_rank_gb": per_rank,
        "per_node_gb": per_node,
    }


def comm_bytes(shape, req, run: RuntimeRequest) -> float:
    """Bytes each GPU sends across the network (or NVLink on one node) per update."""
    w = 4 if req.precision == "fp32" else 2
    p = shape.params
    if req.zero_stage < 3:
        return 2 * w * p if req.gpus > 1 else 0.0
    gather = 1 if run.quantized_weights else w
    backward = 0 if run.hpz_partition_size >= req.per_node and req.gpus > req.per_node else gather
    reduce = 0.5 if run.quantized_gradients else w
    return run.grad_accum * (gather + backward + reduce) * p if req.gpus > 1 else 0.0


def step_time(shape, req, run: RuntimeRequest, checkpointing: bool) -> dict[str, float]:
    tokens = req.micro_batch * run.grad_accum * shape.seq_len
    flops = (8 if checkpointing else 6) * shape.params * tokens
    compute = flops / (run.gpu_tflops * 1e12 * run.mfu)
    sent = comm_bytes(shape, req, run)
    gbps = run.net_gbps / req.per_node if req.gpus > req.per_node else NVLINK_GBPS
    comm = sent / (gbps * 1e9 / 8)
    step = max(compute, comm)
    return {
        "compute_seconds": compute,
        "comm_gb_per_step": sent / GB,
        "comm_seconds": comm,
        "step_seconds": step,
        "run_days": step * run.steps / 86400,
    }


def advice(shape, req, run: RuntimeRequest, timing: dict[str, float], checkpointing: bool) -> str | None:
    """What to change when communication dominates a ZeRO-3 step, with the step time it would give."""
    if req.zero_stage != 3 or timing["comm_seconds"] <= timing["compute_seconds"] or req.gpus <= req.per_node:
        return None
    if run.hpz_partition_size >= req.per_node and run.quantized_weights and run.quantized_gradients:
        return (
            f"communication still dominates ({timing['comm_seconds']:.1f} s against {timing['compute_seconds']:.1f} s"
            " of compute): a larger micro-batch per GPU amortises it (on fewer GPUs, or with less accumulation,"
            " to keep the global batch)"
        )
    better = RuntimeRequest(
        **{**run.__dict__, "hpz_partition_size": req.per_node, "quantized_weights": True, "quantized_gradients": True}
    )
    after = step_time(shape, req, better, checkpointing)
    return (
        f"ZeRO-3 traffic ({timing['comm_gb_per_step']:.1f} GB per GPU per step, {timing['comm_seconds']:.1f} s) "
        f"outweighs compute ({timing['compute_seconds']:.1f} s): set transformer.train.hpz_partition_size="
        f"{req.per_node}, quantized_weights=true, quantized_gradients=true (ZeRO++) for "
        f"{after['comm_gb_per_step']:.1f} GB and {after['step_seconds']:.1f} s per step"
    )
