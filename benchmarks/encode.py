"""Encode throughput: the encode actors' work (dVAE tokens + CLIP image and text embeddings in one
pass, from uint8 images and captions) and each model alone, with random weights.

    python benchmarks/encode.py [--preset demo|full] [--images 512] [--batch 256]

`full` is the real size: dVAE at 256 px with K=8192 (n_hid 256) and CLIP with ViT-B/32 shapes
(224 px, patch 32, width 768, 12 layers; text 512 wide, 12 layers). The same CLIP image pass is
also timed the way clip-retrieval does it (transformers' CLIPImageProcessor, then
`get_image_features`), side by side; the ratio is ours over that. Prints JSON with the device.
Anchor: clip-retrieval reports ~2500 images/s for ViT-B/32 on one A100.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from pipeline.config.models import ClipSection, DVAESection
from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.models.clip import ClipConfig, build_clip
from pipeline.models.dvae import DVAE, DVAEConfig
from pipeline.stages.encode_shard import Encoders

PRESETS = {
    "demo": (
        DVAESection(image_size=64, vocab_size=256, n_hid=32, n_blk_per_group=1, n_init=32),
        ClipSection(
            image_size=64, patch_size=16, vision_width=64, vision_layers=2, vision_heads=4,
            text_width=64, text_layers=2, text_heads=4, text_len=32, embed_dim=64,
        ),
    ),
    "full": (DVAESection(), ClipSection()),
}  # fmt: skip


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, cuDNN autotuning)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=PRESETS, default="demo")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    dvae_cfg, clip_cfg = PRESETS[args.preset]
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else None
    rng = np.random.default_rng(0)
    size = dvae_cfg.image_size
    images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    colours, shapes = rng.choice(["red", "green"], args.images), rng.choice(["cube", "star"], args.images)
    captions = [f"a {c} {s} to the left of a blue sphere" for c, s in zip(colours, shapes)]
    tokenizer = train_tokenizer(captions * 4, vocab_size=512, min_frequency=1)
    words = TextTokenizer(tokenizer, 256)
    torch.manual_seed(0)
    dvae = DVAE(dvae_cfg.build(DVAEConfig)).to(device).eval()
    clip = build_clip(clip_cfg.build(ClipConfig), tokenizer).to(device).eval()
    models = Encoders(dvae, clip, words, device, dtype, args.batch)

    def dvae_only():
        with torch.no_grad(), models.autocast():
            for i in range(0, len(images), args.batch):
                x = torch.from_numpy(images[i : i + args.batch]).to(device).permute(0, 3, 1, 2).float() / 255
                dvae.tokens(x)

    def clip_only():
        with torch.no_grad(), models.autocast():
            for i in range(0, len(images), args.batch):
                clip.image_embeddings(clip.preprocess(images[i : i + args.batch]).to(device))

    def clip_reference():
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor

        processor = CLIPImageProcessor(size={"shortest_edge": clip.image_size}, crop_size=clip.image_size)
        with torch.no_grad(), models.autocast():
            for i in range(0, len(images), args.batch):
                pixels = processor(images=list(images[i : i + args.batch]), return_tensors="pt")["pixel_values"]
                clip.model.get_image_features(pixel_values=pixels.to(device, clip.model.dtype))

    def both():
        models.images(images)
        models.captions(captions)

    n = len(images)
    results = {name: n / timed(fn, args.repeats) for name, fn in
               [("dvae_only", dvae_only), ("clip_image_only", clip_only), ("clip_image_reference", clip_reference),
                ("encode_pass", both)]}  # fmt: skip
    print(
        json.dumps(
            {
                "benchmark": "encode",
                "preset": args.preset,
                "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.processor() or 'x86_64'})",
                "threads": torch.get_num_threads(),
                "precision": "bf16" if on_gpu else "fp32",
                "images": n,
                "batch": args.batch,
                "images_per_s": {k: round(v, 1) for k, v in results.items()},
                "clip_ratio_ours_over_reference": round(
                    results["clip_image_only"] / results["clip_image_reference"], 2
                ),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
