"""Training-step throughput of the DALL·E transformer: tokens/s and MFU, FlexAttention block
masks against dense masked SDPA on the same model and batch, printed as JSON with the device.

    .venv/bin/python benchmarks/train.py demo --micro-batch 8              # CPU here
    python benchmarks/train.py small --micro-batch 16 --attention both     # a GPU: bf16, flex vs sdpa
    python benchmarks/train.py 1.3b --micro-batch 8 --checkpoint-activations

One process, one device: the model's forward + backward + a fused AdamW step on random tokens
(the sequence geometry is the paper's: 256 text + 32x32 image tokens; the demo preset uses
jobs/demo.yaml's: 32 text + 16x16 image tokens). MFU = model FLOPs per token (`flops_per_token`,
no recomputation counted) x tokens/s / the device's dense bf16 peak. FlexAttention has no CPU
backward in torch 2.13, so on CPU only SDPA is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from pipeline.config.recipe import load_recipe
from pipeline.models.transformer import Dalle, flops_per_token, param_count, preset
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


def measure(args: argparse.Namespace, attention: str, device: torch.device) -> dict:
    geometry = GEOMETRY["demo" if args.preset == "demo" else "paper"]
    cfg = preset(args.preset, attention=attention, checkpoint_activations=args.checkpoint_activations, **geometry)
    torch.manual_seed(0)
    model = Dalle(cfg).to(device).train()
    on_gpu = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu)
    text = torch.randint(1, cfg.text_vocab, (args.micro_batch, cfg.text_len), device=device)
    image = torch.randint(0, cfg.image_vocab, (args.micro_batch, cfg.image_len), device=device)
    dtype = torch.bfloat16 if on_gpu else torch.float32

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=on_gpu):
            loss, _ = model(text, image, return_loss=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):  # compiles FlexAttention's kernels, warms the allocator
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    tokens_per_s = args.steps * args.micro_batch * cfg.seq_len / seconds
    peak = peak_flops(device, "bf16" if on_gpu else "fp32")
    out = {
        "attention": attention,
        "step_s": seconds / args.steps,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tokens_per_s * flops_per_token(cfg) / 1e12,
        "mfu": tokens_per_s * flops_per_token(cfg) / peak if peak else None,
    }
    if on_gpu:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["demo", "small", "1.3b", "12b"])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", choices=["flex", "sdpa", "both"], default="both")
    parser.add_argument("--checkpoint-activations", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = ["flex", "sdpa"] if args.attention == "both" else [args.attention]
    if device.type == "cpu" and "flex" in wanted:
        wanted.remove("flex")  # no FlexAttention backward on CPU (torch 2.13)
    results = {a: measure(args, a, device) for a in wanted}
    geometry = GEOMETRY["demo" if args.preset == "demo" else "paper"]
    cfg = preset(args.preset, **geometry)
    report = {
        "benchmark": "train_step",
        "preset": args.preset,
        "params": param_count(cfg),
        "seq_len": cfg.seq_len,
        "micro_batch": args.micro_batch,
        "checkpoint_activations": args.checkpoint_activations,
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        "torch_threads": torch.get_num_threads(),
        "flops_per_token": flops_per_token(cfg),
        "results": results,
    }
    if "flex" in results and "sdpa" in results:
        report["flex_over_sdpa_tokens_per_s"] = results["flex"]["tokens_per_s"] / results["sdpa"]["tokens_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
