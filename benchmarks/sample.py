"""Sampling throughput: image tokens/s with and without the KV cache, and candidates/s for N
candidates per prompt including dVAE decoding and CLIP reranking, printed as JSON with the device.

    .venv/bin/python benchmarks/sample.py demo                 # CPU here: the demo's sizes
    python benchmarks/sample.py small --image-size 256         # a GPU: small preset, 32x32 tokens, bf16

Random weights (the speed does not depend on them): the transformer preset with the demo's or
the paper's geometry, a dVAE of the demo's or the paper's size, a CLIP of the demo's or ViT-B/32's
shape, and a BPE tokenizer trained on synthetic captions. Without the cache every new token reruns
the whole sequence, so that path is timed on the last `--recompute-tokens` positions of an image
(the rest given as a prefix) and compared with the cache on the same positions.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import yaml

from pipeline.config.models import ClipSection, DVAESection
from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.models.clip import ClipConfig, build_clip
from pipeline.models.dvae import DVAE, DVAEConfig
from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.models.sampling import sample_image_tokens
from pipeline.models.transformer import Dalle, param_count, preset
from pipeline.synthetic.captions import COLOURS, POSITIONS, SHAPES, SIZES, caption

DEMO = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml").read_text())
PROMPT = "a small orange diamond to the left of a large purple circle"


def models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None) -> ImageGenerator:
    demo = args.preset == "demo"
    text_len = DEMO["text_tokenizer"]["text_len"] if demo else 256
    rng = random.Random(0)
    scenes = [
        {"colour": c, "shape": s, "size": z, "position": p}
        for c in COLOURS
        for s in SHAPES
        for z in SIZES
        for p in POSITIONS
    ]
    bpe = train_tokenizer([caption([o], None, rng) for o in scenes], vocab_size=1024)
    dvae_cfg = DVAESection(**{k: v for k, v in DEMO["dvae"].items() if k != "train"}) if demo else DVAESection()
    dvae_cfg = dvae_cfg.model_copy(update={"image_size": args.image_size or dvae_cfg.image_size})
    clip_cfg = ClipSection(**{k: v for k, v in DEMO["clip"].items() if k != "train"}) if demo else ClipSection()
    torch.manual_seed(0)
    dvae = DVAE(dvae_cfg.build(DVAEConfig))
    cfg = preset(
        args.preset,
        text_len=text_len,
        text_vocab=bpe.get_vocab_size(),
        image_grid=dvae_cfg.grid,
        image_vocab=dvae_cfg.vocab_size,
    )
    dalle = Dalle(cfg).to(device).eval()
    if dtype is not None:
        dalle = dalle.to(dtype)
    clip = build_clip(clip_cfg.build(ClipConfig), bpe).to(device).eval()
    return ImageGenerator(dalle, dvae.to(device).eval(), clip, TextTokenizer(bpe, text_len), device, dtype)


def _timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=("demo", "small", "1.3b"))
    p.add_argument("--image-size", type=int, default=None, help="dVAE image size (default: demo 64, else 256)")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--batch", type=int, default=64, help="candidates decoded together")
    p.add_argument("--recompute-tokens", type=int, default=8, help="positions timed without the cache")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    dtype = torch.bfloat16 if device.type == "cuda" else None
    gen = models(args, device, dtype)
    cfg, n = gen.dalle.cfg, gen.dalle.cfg.image_len
    text = gen.text_ids(PROMPT, args.batch).to(device)
    seeds = list(range(args.batch))
    sample_image_tokens(gen.dalle, text[:2], seeds=seeds[:2])  # warm-up (allocator, kernels)

    full_s, _ = _timed(lambda: sample_image_tokens(gen.dalle, text, seeds=seeds), device)
    k = min(args.recompute_tokens, n)
    prefix = torch.randint(0, cfg.image_vocab, (args.batch, n - k), device=device)
    cached_s, _ = _timed(lambda: sample_image_tokens(gen.dalle, text, seeds=seeds, prefix=prefix), device)
    recompute_s, _ = _timed(
        lambda: sample_image_tokens(gen.dalle, text, seeds=seeds, prefix=prefix, use_cache=False), device
    )
    sampling = SamplingConfig(batch_size=args.batch)
    total_s, result = _timed(lambda: gen.generate(PROMPT, args.candidates, sampling), device)
    sample_s, tokens = _timed(lambda: gen.sample(PROMPT, args.candidates, sampling), device)
    decode_s, images = _timed(lambda: gen.decode(tokens, args.batch), device)
    score_s, _ = _timed(lambda: gen.scores(images, PROMPT, args.batch), device)
    figures = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "preset": args.preset,
        "params": param_count(cfg),
        "image_tokens": n,
        "image_size": gen.dvae.image_size,
        "batch": args.batch,
        "tokens_per_s_cached": round(args.batch * n / full_s, 1),
        "cached_vs_recompute": {
            "positions": k,
            "tokens_per_s_cached": round(args.batch * k / cached_s, 1),
            "tokens_per_s_recompute": round(args.batch * k / recompute_s, 1),
            "speedup": round(recompute_s / cached_s, 2),
        },
        "candidates": args.candidates,
        "candidates_per_s": round(args.candidates / total_s, 2),
        "seconds": {
            "sample": round(sample_s, 3),
            "decode": round(decode_s, 3),
            "clip_rerank": round(score_s, 3),
            "total": round(total_s, 3),
        },
        "best_clip_score": round(float(result.scores[result.order[0]]), 4),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
