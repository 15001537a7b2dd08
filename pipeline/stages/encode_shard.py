"""Encoding one filtered shard: the models an encode actor holds, and the pure per-shard work.

Images are decoded on a thread pool (PIL releases the GIL), then go through the dVAE encoder
(argmax tokens) and CLIP in batches, under bf16/fp16 autocast on GPU. Output samples keep the
filtered shard's order, so token rows stay aligned with their keys by construction; the
manifest repeats the keys and the writer checks both against each other.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage
from pipeline.data.image_tensors import to_tensor
from pipeline.data.images import decode_rgb
from pipeline.data.loader import ShardSpan, read_span
from pipeline.data.shards import npy_bytes, write_tar
from pipeline.engine.ledger import Attempt, ShardResult
from pipeline.engine.schemas import ENCODED_MANIFEST, validate_table
from pipeline.stages.encode_task import DROP_REASON, EncodeTask

# JPEG decoding and CLIP's resize run here (PIL releases the GIL), so a GPU actor is not bound by one core
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="decode")


@dataclass
class Encoders:
    """The models of one encode actor."""

    dvae: Any
    clip: Any
    text: Any  # pipeline.models.bpe.TextTokenizer
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int

    @classmethod
    def load(
        cls,
        *,
        dvae: str,
        clip: str,
        tokenizer: str,
        text_len: int,
        batch_size: int,
        precision: str = "auto",
        device: str = "cpu",
    ) -> Encoders:
        """The models at those URLs on `device`; precision "auto" is bf16 on CUDA, else fp32."""
        from pipeline.models.bpe import TextTokenizer
        from pipeline.models.clip import load_clip
        from pipeline.models.dvae import load_dvae

        on_gpu = device == "cuda"
        if precision == "auto":
            precision = "bf16" if on_gpu else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        models = (load_dvae(dvae).to(device).eval(), load_clip(clip).to(device).eval())
        return cls(*models, TextTokenizer.load(tokenizer, text_len), torch.device(device), dtype, batch_size)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 BxHxWx3 -> (image tokens uint16 [B, grid²], CLIP image embeddings float32 [B, D])."""
        tokens, embeds = [], []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            pixels = torch.cat(list(_POOL.map(lambda image: self.clip.preprocess(image[None]), chunk)))
            with self.autocast():
                tokens.append(self.dvae.tokens(to_tensor(chunk, self.device)).cpu())
                embeds.append(self.clip.image_embeddings(pixels.to(self.device, non_blocking=True)).float().cpu())
        return torch.cat(tokens).numpy().astype(np.uint16), torch.cat(embeds).numpy()

    @torch.no_grad()
    def captions(self, captions: list[str]) -> np.ndarray:
        """CLIP text embeddings float32 [B, D]."""
        embeds = []
        for i in range(0, len(captions), self.batch_size):
            tokens = self.clip.tokenize(captions[i : i + self.batch_size])
            with self.autocast():
                ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
                embeds.append(self.clip.text_embeddings(ids, mask).float().cpu())
        return torch.cat(embeds).numpy()


def encode_shard(models: Encoders, task: EncodeTask, attempt: Attempt, threshold: float | None) -> ShardResult:
    """Encodes one filtered shard into `<shard>.tar` + `<shard>.parquet`, dropping pairs whose
    CLIP similarity is below `threshold` (None keeps every pair)."""
    shard = task.shard
    samples = read_span(ShardSpan(task.url, task.count))
    manifest = storage.read_parquet(task.manifest).to_pylist()
    if [m["key"] for m in manifest] != [s["__key__"] for s in samples]:
        raise RuntimeError(f"encode shard {shard}: the filtered tar and its manifest list different keys")
    size = models.dvae.image_size
    images = np.stack(list(_POOL.map(lambda s: decode_rgb(s["jpg"], size), samples)))
    captions = [s["txt"].decode() for s in samples]
    image_tokens, image_emb = models.images(images)
    text_emb = models.captions(captions)
    similarity = (image_emb * text_emb).sum(1)
    keep = similarity >= threshold if threshold is not None else np.ones(len(samples), dtype=bool)

    out, rows = [], []
    for i in np.flatnonzero(keep):
        sample, meta = samples[i], manifest[i]
        ids = models.text.ids(captions[i])
        text_tokens = models.text.pad(ids).astype(np.uint16)
        info = {**json.loads(sample["json"]), "clip_similarity": round(float(similarity[i]), 6)}
        out.append(
            {
                "__key__": sample["__key__"],
                "image_tokens.npy": npy_bytes(image_tokens[i]),
                "text_tokens.npy": npy_bytes(text_tokens),
                "clip_image.npy": npy_bytes(image_emb[i].astype(np.float16)),
                "clip_text.npy": npy_bytes(text_emb[i].astype(np.float16)),
                "txt": sample["txt"],
                "json": json.dumps(info, sort_keys=True),
            }
        )
        rows.append(
            {
                "key": meta["key"],
                "caption": meta["caption"],
                "url": meta["url"],
                "sha256": meta["sha256"],
                "original_width": meta["original_width"],
                "original_height": meta["original_height"],
                "clip_similarity": float(similarity[i]),
                "text_length": len(ids),
            }
        )
    table = pa.Table.from_pylist(rows, schema=ENCODED_MANIFEST)
    validate_table(table, ENCODED_MANIFEST, f"encode shard {shard} manifest")
    write_tar(attempt.path(f"{shard}.tar"), out)
    storage.write_parquet(attempt.path(f"{shard}.parquet"), table)
    return ShardResult(samples_in=len(samples), samples_out=len(out), counts={DROP_REASON: int((~keep).sum())})
