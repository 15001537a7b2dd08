"""CLIP's training task (what Ray Train's workers run) and its held-out retrieval scores: the
model side of the clip stage, imported by the workers and, to score, by the stage."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import ClipSection
from pipeline.data.images import decode_rgb
from pipeline.data.shards import Sample


class ClipLoss(nn.Module):
    """CLIPModel whose forward is the contrastive loss (what the DeepSpeed engine calls).

    DeepSpeed cannot broadcast 0-dim parameters, so CLIP's scalar `logit_scale` trains as a
    1-element vector (it broadcasts the same) and is turned back into a scalar at export."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.model = clip.model
        self.model.logit_scale = nn.Parameter(self.model.logit_scale.detach().reshape(1))

    def export(self, url: str) -> None:
        self.model.float()
        self.model.logit_scale = nn.Parameter(self.model.logit_scale.detach().reshape(()))
        self.clip.save(url)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        return self.clip.contrastive_loss(pixel_values, input_ids, attention_mask)


@torch.no_grad()
def retrieval_scores(clip, pairs: list[tuple[np.ndarray, str]], device: torch.device) -> dict[str, float]:
    """On held-out pairs: image→text top-1 accuracy among them, mean matched and mismatched cosine."""
    images = clip.preprocess(np.stack([p[0] for p in pairs])).to(device)
    tokens = {k: v.to(device) for k, v in clip.tokenize([p[1] for p in pairs]).items()}
    img = clip.image_embeddings(images).float()
    txt = clip.text_embeddings(tokens["input_ids"], tokens["attention_mask"]).float()
    sims = img @ txt.T
    n = len(pairs)
    matched = sims.diag()
    mismatched = (sims.sum() - matched.sum()) / max(n * n - n, 1)
    return {
        "retrieval_top1": float((sims.argmax(1) == torch.arange(n, device=device)).float().mean()),
        "matched_cosine": float(matched.mean()),
        "mismatched_cosine": float(mismatched),
    }


class ClipTask:
    """CLIP as a `pipeline.train.loop.TrainTask`; config: {"clip": ClipSection, "tokenizer": url}."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = ClipSection.model_validate(config["clip"])
        self.tokenizer_url = config["tokenizer"]
        self._clip = None

    def build_model(self) -> nn.Module:
        from tokenizers import Tokenizer

        from pipeline.models.clip import ClipConfig, build_clip

        tokenizer = Tokenizer.from_str(storage.read_bytes(self.tokenizer_url).decode())
        clip = build_clip(self.cfg.build(ClipConfig), tokenizer, seed=self.cfg.train.seed)
        self._clip = self._clip or clip  # preprocessing and tokenizing come from the first one
        return ClipLoss(clip)

    def decode(self, sample: Sample) -> tuple[np.ndarray, str]:
        return decode_rgb(sample["jpg"]), sample["txt"].decode()

    def collate(self, items: list, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        pixels = self._clip.preprocess(np.stack([i[0] for i in items])).to(device)
        tokens = self._clip.tokenize([i[1] for i in items])
        return {
            "pixel_values": pixels.to(dtype) if dtype is not None else pixels,
            **{k: v.to(device) for k, v in tokens.items()},
        }

    def loss(self, engine, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss = engine(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return loss, {"logit_scale": engine.module.model.logit_scale.detach().exp()}

    def evaluate(self, model: nn.Module, held: list, device: torch.device) -> tuple[dict, dict]:
        return (retrieval_scores(model.clip, held, device) if len(held) > 1 else {}), {}

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        model.export(storage.join(out_url, "model"))
        return sorted(f"model/{n}" for n in storage.list_names(storage.join(out_url, "model")))
