"""The transformer's training task (what Ray Train's workers run) and the model a run's encoded
shards call for: the model side of the train stage."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import TransformerSection
from pipeline.config.recipe import Recipe
from pipeline.data.loader import EPOCH
from pipeline.data.shards import Sample, npy_load
from pipeline.errors import InputError
from pipeline.models.bpe import BPE_DROPOUT, EMPTY_CAPTION, TextTokenizer, caption_rng
from pipeline.models.layout import MODELS_FILE
from pipeline.models.transformer import PRESETS, DalleConfig, flops_per_token, sample_losses, write_dalle_config
from pipeline.models.weight_files import DTYPES, ShardedWriter


class TransformerTask:
    """The transformer as a `pipeline.train.loop.TrainTask`. Config: {"model": DalleConfig
    dict, "eval_batch_size": int, "export_precision": "fp32" | "bf16" | "fp16", "bpe_dropout":
    float, "null_caption_prob": float, "seed": int, "models": {"dvae", "clip", "tokenizer": URL}}
    (the companions the export names in `models.json`, for sampling; the tokenizer also
    re-tokenizes captions for BPE dropout)."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = DalleConfig.from_dict(config["model"])
        self.eval_batch_size = int(config.get("eval_batch_size", 16))
        self.export_dtype = DTYPES[config.get("export_precision", "fp32")]
        self.models = dict(config.get("models", {}))
        self.bpe_dropout = float(config.get("bpe_dropout", 0.0))
        self.null_caption_prob = float(config.get("null_caption_prob", 0.0))
        self.seed = int(config.get("seed", 0))
        if self.bpe_dropout > 0 and "tokenizer" not in self.models:
            raise ValueError("transformer task: bpe_dropout needs models.tokenizer")
        self._tokenizer: TextTokenizer | None = None
        self.tokens_per_sample = self.cfg.seq_len
        self.flops_per_token = flops_per_token(self.cfg)

    def build_model(self) -> nn.Module:
        from pipeline.models.transformer import Dalle

        return Dalle(self.cfg)

    def decode(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(text ids, image ids). A training sample's caption is, drawn from (seed, epoch, key): the
        empty caption (all padding) with probability `null_caption_prob`, else re-tokenized with BPE
        dropout when `bpe_dropout` > 0, else the encoded tokens. Held-out samples carry no epoch and
        always keep their encoded tokens."""
        image = npy_load(sample["image_tokens.npy"]).astype(np.int64)
        if EPOCH in sample:
            epoch, key = sample[EPOCH], sample["__key__"]
            if self.null_caption_prob > 0:
                if caption_rng(self.seed, epoch, key, EMPTY_CAPTION).random() < self.null_caption_prob:
                    return np.zeros(self.cfg.text_len, dtype=np.int64), image
            if self.bpe_dropout > 0:
                rng = caption_rng(self.seed, epoch, key, BPE_DROPOUT)
                return self._text().encode(sample["txt"].decode(), self.bpe_dropout, rng).astype(np.int64), image
        return npy_load(sample["text_tokens.npy"]).astype(np.int64), image

    def _text(self):
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.load(self.models["tokenizer"], self.cfg.text_len)
        return self._tokenizer

    def collate(self, items: list[tuple[np.ndarray, np.ndarray]], device: torch.device, dtype) -> dict:
        text = torch.from_numpy(np.stack([t for t, _ in items]))
        image = torch.from_numpy(np.stack([i for _, i in items]))
        return {"text": text.to(device), "image": image.to(device)}

    def loss(self, engine, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        loss, parts = engine(batch["text"], batch["image"], return_loss=True)
        return loss, parts

    @torch.no_grad()
    def heldout_losses(self, model: nn.Module, held: list, device: torch.device) -> dict[str, np.ndarray]:
        """Each held-out sample's losses (the training loss and its text and image parts)."""
        out: dict[str, list[np.ndarray]] = {"heldout_loss": [], "heldout_text_loss": [], "heldout_image_loss": []}
        for start in range(0, len(held), self.eval_batch_size):
            batch = self.collate(held[start : start + self.eval_batch_size], device, None)
            for key, value in zip(out, sample_losses(model, batch["text"], batch["image"])):
                out[key].append(value.cpu().numpy())
        return {k: np.concatenate(v) for k, v in out.items()}

    def evaluate(self, model: nn.Module, held: list, device: torch.device) -> tuple[dict, dict]:
        """Held-out losses (means over the held-out set) of a whole model on one process."""
        if not held:
            return {}, {}
        return {k: float(v.mean(dtype=np.float64)) for k, v in self.heldout_losses(model, held, device).items()}, {}

    def export_tensors(self, tensors, out_url: str) -> list[str]:
        """Streams the final weights into sharded safetensors, then `config.json` and `models.json`."""
        writer = ShardedWriter(out_url, self.export_dtype)
        for name, value in tensors:
            writer.add(name, value)
        files = [*writer.close(), "config.json"]
        write_dalle_config(self.cfg, out_url)
        if self.models:
            storage.write_json(storage.join(out_url, MODELS_FILE), self.models)
            files.append(MODELS_FILE)
        return files

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        return self.export_tensors(model.state_dict().items(), out_url)


def model_config(plan: dict[str, Any], transformer: TransformerSection) -> DalleConfig:
    """The model for the encoded shards described by the encode stage's `plan`: the preset's
    sizes unless the section overrides them, the section's other settings, the plan's vocabularies."""
    grid = math.isqrt(plan["image_tokens"])
    if grid * grid != plan["image_tokens"]:
        raise InputError(f"encode plan: {plan['image_tokens']} image tokens per sample is not a square grid")
    sizes = {k: v for k, v in PRESETS[transformer.preset].items() if getattr(transformer, k) is None}
    try:
        return transformer.build(
            DalleConfig,
            **sizes,
            text_len=plan["text_len"],
            text_vocab=plan["text_vocab"],
            image_grid=grid,
            image_vocab=plan["image_vocab"],
        )
    except ValueError as err:
        raise InputError(f"transformer: {err}") from None


def recipe_model_config(recipe: Recipe) -> DalleConfig:
    """The model a recipe trains, from its tokenizer and dVAE settings (before anything ran)."""
    plan = {
        "image_tokens": recipe.dvae.grid**2,
        "image_vocab": recipe.dvae.vocab_size,
        "text_len": recipe.text_tokenizer.text_len,
        "text_vocab": recipe.text_tokenizer.vocab_size,
    }
    return model_config(plan, recipe.transformer)
