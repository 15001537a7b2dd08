"""Throughput figures of a training step: the device's peak FLOP/s (for MFU) and its memory.

MFU = achieved model FLOPs per second per device / the device's dense peak at the training
precision (model FLOPs: the task's count per token, without recomputation; PaLM's definition).
Peaks are the vendors' dense (no sparsity) tensor-core figures.
"""

from __future__ import annotations

import resource
import sys

import torch

# name fragment (lower case) -> {precision: dense peak FLOP/s}
_PEAKS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "a10g": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The dense peak FLOP/s of `device` at `precision`, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for fragment, peaks in _PEAKS.items():
        if fragment in name:
            return peaks.get(precision)
    return None


def memory_gb(device: torch.device) -> dict[str, float]:
    """Peak device memory since the last call (GPU), or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
        return {"memory_gb": peak}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"rss_gb": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def rates(
    samples_per_s: float, tokens_per_sample: int, flops_per_token: float, world: int, peak: float | None
) -> dict[str, float]:
    """Tokens/s (all ranks) and MFU (when the device's peak is known)."""
    tokens = samples_per_s * tokens_per_sample
    out = {"tokens_per_s": tokens}
    if peak:
        out["mfu"] = tokens * flops_per_token / (world * peak)
    return out
