"""Training-step throughput of the DALL·E transformer through the train stage's DeepSpeed engine
(world of one, bf16 on a GPU): tokens/s, MFU and peak memory, FlexAttention block masks against
dense masked SDPA on the same model and batch, with and without compiled blocks; JSON with the device.

    .venv/bin/python benchmarks/train.py demo --micro-batch 8              # CPU here
    python benchmarks/train.py small --micro-batch 16 --compile both       # a GPU: flex vs sdpa
    python benchmarks/train.py 1.3b --micro-batch 8 --checkpoint-activations

The model, the engine (`pipeline.train.engine`: DeepSpeed's fused AdamW and bf16 on GPU, torch's
AdamW in fp32 on CPU) and the micro-step (`pipeline.train.loop.micro_step`) are the train stage's,
fed random tokens of the paper's geometry (256 text + 32x32 image tokens; the demo preset uses
jobs/demo.yaml's: 32 text + 16x16). MFU = model FLOPs per token (`flops_per_token`, no
recomputation counted) x tokens/s / the device's dense bf16 peak. FlexAttention has no CPU
backward in torch 2.13, so on CPU only SDPA is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from local_rank import device_name, stage_engine

from pipeline.config.models import TransformerTrainConfig
from pipeline.config.recipe import load_recipe
from pipeline.models.transformer import flops_per_token, param_count, preset
from pipeline.stages.train_task import TransformerTask
from pipeline.train.engine import autocast_dtype
from pipeline.train.loop import micro_step, window_means
from pipeline.train.throughput import peak_flops

_DEMO = load_recipe(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml")
GEOMETRY = {
    "demo": {
        "text_len": _DEMO.text_tokenizer.text_len,
        "text_vocab": _DEMO.text_tokenizer.vocab_size,
        "image_grid": _DEMO.dvae.grid,
        "image_vocab": _DEMO.dvae.vocab_size,
    },
    "paper": {"text_len": 256, "text_vocab": 16384, "image_grid": 32, "image_vocab": 8192},
}


def measure(args: argparse.Namespace, attention: str, compiled: bool, device: torch.device) -> dict:
    geometry = GEOMETRY["demo" if args.preset == "demo" else "paper"]
    cfg = preset(args.preset, attention=attention, checkpoint_activations=args.checkpoint_activations, **geometry)
    task = TransformerTask({"model": cfg.to_dict()})
    on_gpu = device.type == "cuda"
    train = TransformerTrainConfig(
        batch_size=args.micro_batch,
        precision="bf16",
        zero_stage=args.zero_stage,
        lr=1e-4,
        grad_clip=4.0,
        compile="on" if compiled else "off",  # the stage's own switch (`transformer.train.compile`)
    )
    engine = stage_engine(task.build_model, train, on_gpu)
    dtype = autocast_dtype(train, on_gpu)
    rng = np.random.default_rng(0)
    items = [
        (rng.integers(1, cfg.text_vocab, cfg.text_len), rng.integers(0, cfg.image_vocab, cfg.image_len))
        for _ in range(args.micro_batch)
    ]
    generator = torch.Generator(device=device)

    def steps(n: int) -> float:
        window = [micro_step(task, engine, items, i, generator, device, dtype) for i in range(n)]
        return window_means(window)["loss"]  # reads the device once, at the end

    started = time.perf_counter()
    steps(args.warmup)  # compiles the kernels, warms the allocator
    warmup_s = time.perf_counter() - started
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loss = steps(args.steps)
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * args.micro_batch * cfg.seq_len / seconds
    peak = peak_flops(device, "bf16" if on_gpu else "fp32")
    out = {
        "attention": attention,
        "compiled": compiled,
        "warmup_s": round(warmup_s, 2),
        "step_s": seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tokens_per_s * flops_per_token(cfg) / 1e12,
        "mfu": tokens_per_s * flops_per_token(cfg) / peak if peak else None,
        "loss": loss,
    }
    if on_gpu:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def measured(args: argparse.Namespace, attention: str, compiled: bool, device: torch.device) -> dict:
    """`measure`, then the engine's memory given back (DeepSpeed engines hold reference cycles)."""
    out = measure(args, attention, compiled, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["demo", "small", "1.3b", "12b"])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", choices=["flex", "sdpa", "both"], default="both")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile the blocks")
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--checkpoint-activations", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = ["flex", "sdpa"] if args.attention == "both" else [args.attention]
    if device.type == "cpu" and "flex" in wanted:
        wanted.remove("flex")  # no FlexAttention backward on CPU (torch 2.13)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = {
        f"{a}{'+compile' if c else ''}": measured(args, a, c, device) for a in wanted for c in compiles
    }  # fmt: skip
    geometry = GEOMETRY["demo" if args.preset == "demo" else "paper"]
    cfg = preset(args.preset, **geometry)
    report = {
        "benchmark": "train_step",
        "preset": args.preset,
        "params": param_count(cfg),
        "seq_len": cfg.seq_len,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
        "checkpoint_activations": args.checkpoint_activations,
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "device": device_name(device),
        "flops_per_token": flops_per_token(cfg),
        "results": results,
    }
    for suffix in ("", "+compile"):
        flex, sdpa = results.get("flex" + suffix), results.get("sdpa" + suffix)
        if flex and sdpa:
            report[f"flex_over_sdpa{suffix.replace('+', '_')}"] = flex["tokens_per_s"] / sdpa["tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
