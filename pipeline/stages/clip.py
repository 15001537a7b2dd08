"""clip: train a CLIP contrastively on the filtered pairs (Ray Train + DeepSpeed) when the recipe
gives no weights, or check the given HF-format folder. Commits `metrics.json` (held-out
image→text retrieval accuracy, matched and mismatched cosine) and, when trained, `model/`.

A trained CLIP's text tower reads our BPE tokenizer (from text-tokenizer), saved with the model
so the folder loads like any HF CLIP. The contrastive loss uses each worker's own batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import ClipSection
from pipeline.config.recipe import Recipe
from pipeline.data.images import decode_rgb
from pipeline.data.loader import read_span, split_holdout
from pipeline.data.shards import Sample
from pipeline.engine.ledger import Attempt, Ledger, checksum_files
from pipeline.errors import InputError
from pipeline.stages.base import RunContext
from pipeline.stages.model_stage import ModelStage

HOLDOUT = 64


def clip_path(recipe: Recipe, output_dir: str) -> str:
    """Where the CLIP the pipeline uses lives: the recipe's weights, else the trained one."""
    if recipe.clip.weights is not None:
        return storage.absolute(recipe.clip.weights)
    return storage.join(output_dir, "clip", "model")


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


class ClipStage(ModelStage):
    name = "clip"
    config_key = "clip"
    upstream = ("filter", "text-tokenizer")
    task = "pipeline.stages.clip:ClipTask"

    def inspect_inputs(self) -> dict[str, Any]:
        if self.cfg.weights is None:
            return {}
        path = storage.absolute(self.cfg.weights)
        if not storage.exists(storage.join(path, "config.json")):
            raise InputError(f"clip.weights: {path} is not a CLIP folder in Hugging Face format (no config.json)")
        return {"weights": checksum_files([storage.join(path, "config.json")])}

    def held_out(self) -> list[tuple[np.ndarray, str]]:
        _, held = split_holdout(Ledger(self.upstream_url("filter")).spans(), HOLDOUT)
        return [(decode_rgb(s["jpg"]), s["txt"].decode()) for span in held for s in read_span(span)]

    def build(self, attempt: Attempt, ctx: RunContext) -> int:
        """Trains into `model/`; nothing to write when the recipe gives weights."""
        if self.cfg.weights is not None:
            return 0
        config = {"clip": self.cfg.model_dump(mode="json"), "tokenizer": self.tokenizer_url()}
        trained = self.train(attempt.folder, ctx, config, HOLDOUT)
        attempt.adopt(*sorted(f"model/{n}" for n in storage.list_names(storage.join(attempt.folder, "model"))))
        return trained

    def score(self, attempt: Attempt) -> dict[str, float]:
        from pipeline.models.clip import load_clip

        trained = storage.join(attempt.folder, "model")
        path = trained if self.cfg.weights is None else storage.absolute(self.cfg.weights)
        try:
            clip = load_clip(path)
        except ValueError as err:
            raise InputError(f"clip.weights: {err}") from None
        return retrieval_scores(clip.eval(), self.held_out(), torch.device("cpu"))

    def tokenizer_url(self) -> str:
        return storage.join(self.upstream_url("text-tokenizer"), "tokenizer.json")
