"""clip: train a CLIP contrastively on the filtered pairs (Ray Train + DeepSpeed) when the recipe
gives no weights, or check the given HF-format folder. Commits `metrics.json` (held-out
image→text retrieval accuracy, matched and mismatched cosine) and, when trained, `model/`.

A trained CLIP's text tower reads our BPE tokenizer (from text-tokenizer), saved with the model
so the folder loads like any HF CLIP. The contrastive loss uses each worker's own batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config.recipe import Recipe
from pipeline.data.images import decode_rgb
from pipeline.data.loader import read_span, split_holdout
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


class ClipStage(ModelStage):
    name = "clip"
    config_key = "clip"
    upstream = ("filter", "text-tokenizer")
    task = "pipeline.stages.clip_task:ClipTask"

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
        import torch

        from pipeline.models.clip import load_clip
        from pipeline.stages.clip_task import retrieval_scores

        trained = storage.join(attempt.folder, "model")
        path = trained if self.cfg.weights is None else storage.absolute(self.cfg.weights)
        try:
            clip = load_clip(path)
        except ValueError as err:
            raise InputError(f"clip.weights: {err}") from None
        return retrieval_scores(clip.eval(), self.held_out(), torch.device("cpu"))

    def tokenizer_url(self) -> str:
        return storage.join(self.upstream_url("text-tokenizer"), "tokenizer.json")
