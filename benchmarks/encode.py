"""Encode throughput: the encode actors' work (dVAE tokens + CLIP image and text embeddings in one
pass, from uint8 images and captions) and each model alone, with random weights.

    python benchmarks/encode.py [--preset demo|full] [--images 512] [--batch 256]

`full` is the real size: dVAE at 256 px with K=8192 (n_hid 256) and CLIP with ViT-B/32 shapes
(224 px, patch 32, width 768, 12 layers; text 512 wide, 12 layers). `encode_pass` is the encode
actor's whole work on one filtered shard of JPEGs (`encode_shard`: read the tar, decode, resize,
dVAE tokens, CLIP image and text embeddings, BPE, write the encoded shard). The same CLIP image pass is
also timed the way clip-retrieval does it (transformers' CLIPImageProcessor, then
`get_image_features`), side by side; the ratio is ours over that. Prints JSON with the device.
Anchor: clip-retrieval reports ~2500 images/s for ViT-B/32 on one A100.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config.models import ClipSection, DVAESection
from pipeline.engine.ledger import Attempt, Ledger
from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.models.clip import ClipConfig, build_clip
from pipeline.models.dvae import DVAE, DVAEConfig
from pipeline.stages.encode_shard import Encoders, EncodeTask, encode_shard

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


def filtered_shard(images: np.ndarray, captions: list[str], folder: Path) -> EncodeTask:
    """`images` as JPEGs in a filtered shard (tar + manifest) under `folder`."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pipeline import storage
    from pipeline.data.shards import write_tar

    samples, rows = [], []
    for i, (image, text) in enumerate(zip(images, captions)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        samples.append({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": text.encode(), "json": b"{}"})
        size = image.shape[0]
        rows.append({"key": f"{i:09d}", "caption": text, "url": f"http://127.0.0.1/{i}.jpg", "sha256": "0" * 64,
                     "original_width": size, "original_height": size})  # fmt: skip
    write_tar(str(folder / "00000.tar"), samples)
    storage.write_parquet(str(folder / "00000.parquet"), pa.Table.from_pylist(rows))
    return EncodeTask("00000", str(folder / "00000.tar"), str(folder / "00000.parquet"), len(samples))


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
    # smooth random pictures (8x8-pixel blocks), so the JPEGs have a photo's size rather than noise's
    coarse = rng.integers(0, 256, (args.images, -(-size // 8), -(-size // 8), 3), dtype=np.uint8)
    images = np.ascontiguousarray(coarse.repeat(8, 1).repeat(8, 2)[:, :size, :size])
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

    folder = Path(tempfile.mkdtemp(prefix="encode-bench-"))
    task = filtered_shard(images, captions, folder / "filtered")
    ledger = Ledger(str(folder / "encoded"))

    def both():
        encode_shard(models, task, Attempt(ledger, task.shard, "bench"), threshold=None)

    n = len(images)
    results = {name: n / timed(fn, args.repeats) for name, fn in
               [("dvae_only", dvae_only), ("clip_image_only", clip_only), ("clip_image_reference", clip_reference),
                ("encode_pass", both)]}  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
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
