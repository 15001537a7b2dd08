"""Recipe sections of the generation stages: `sample` (images for a prompt list) and `evaluate`
(generated images checked against the synthetic data's ground truth)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Config


class GenerationSection(Config):
    """How candidates are drawn, reranked and where the models run (shared by sample and evaluate)."""

    execution_only = frozenset({"actors", "wandb_project", "batch_size"})

    candidates: int = Field(512, ge=1, le=65536)
    """Images drawn per prompt (the paper: 512)."""
    top: int = Field(32, ge=1)
    """Candidates kept per prompt after CLIP reranking (the paper: 32)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of the image-token distribution."""
    top_k: int | None = Field(None, ge=1)
    """Sample only among the k most probable tokens; null: all."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Sample only from the smallest set of tokens holding this probability mass; null: all."""
    batch_size: int | None = Field(None, ge=1)
    """Candidates decoded together; null: as many as their KV caches fit in the device's free memory
    (≈1.3 GB each at 12B in bf16). The images do not depend on it."""
    seed: int = 0
    """Seed of the candidates: the same seed and prompt give the same images."""
    guidance: float = Field(1.0, ge=0, le=100)
    """Classifier-free guidance scale: each candidate also runs after the empty caption and draws from
    `uncond + guidance * (cond - uncond)` (twice the sampling compute); 1: unguided. Needs a model
    trained with `transformer.train.null_caption_prob` > 0."""
    actors: int | None = Field(None, ge=1)
    """Actors holding the models; null: a pool Ray Data grows from one actor to one per prompt
    while the cluster has room."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """GPUs each actor asks Ray for; 0 or null (unset) draws on CPUs. The recipe decides, never the
    cluster of the moment (see `encode.gpus_per_actor`)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Inference precision; auto is bf16 on GPU and fp32 on CPU."""
    wandb_project: str | None = None
    """W&B project of the stage's run; null logs offline under the stage folder."""

    @model_validator(mode="after")
    def _top(self) -> GenerationSection:
        if self.top > self.candidates:
            raise ValueError(f"top {self.top} is above candidates {self.candidates}")
        return self


class CompletionPrompt(Config):
    """Image completion (the paper's figure 2 setting): the top `rows` token rows of `image` are
    kept and the rest of the grid is drawn for `prompt`."""

    prompt: str = Field(min_length=1)
    """The caption the rest of the image is drawn for."""
    image: str = Field(min_length=1)
    """A JPEG or PNG (path or URL), resized to the dVAE's image size and encoded to tokens."""
    rows: int = Field(ge=0)
    """Token rows of `image` kept, from the top (at most the dVAE's grid)."""


class SampleSection(GenerationSection):
    """The `sample` stage: a reranked grid and the single images with their scores per prompt."""

    prompts: tuple[str, ...] = ()
    """Captions to draw images for (one shard each)."""
    completions: tuple[CompletionPrompt, ...] = ()
    """Image-completion prompts (one shard each, after `prompts`)."""
    grid_columns: int = Field(8, ge=1)
    """Columns of each prompt's grid of kept images."""

    @model_validator(mode="after")
    def _some_prompt(self) -> SampleSection:
        if not self.prompts and not self.completions:
            raise ValueError("no prompts and no completions: give at least one")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("a prompt is empty")
        return self


class EvaluateSection(GenerationSection):
    """The `evaluate` stage: prompts built from the synthetic vocabulary, images read back by the
    analyzer, per-attribute and whole-caption accuracy before and after CLIP reranking."""

    candidates: int = Field(64, ge=1, le=65536)
    """Images drawn per prompt."""
    top: int = Field(4, ge=1)
    """Candidates kept per prompt after reranking; "after reranking" figures are over these."""
    seen_one: int = Field(40, ge=0)
    """One-object prompts whose colour-shape pair was in the training data."""
    heldout_one: int = Field(20, ge=0)
    """One-object prompts whose colour-shape pair was held out of the training data."""
    seen_two: int = Field(20, ge=0)
    """Two-object prompts made of seen pairs."""
    heldout_two: int = Field(10, ge=0)
    """Two-object prompts with one held-out pair."""
    paraphrased: int = Field(20, ge=0)
    """Seen one-object scenes captioned with the training data's other templates."""
    prompt_seed: int = 0
    """Seed of the prompt set (which scenes, which phrasings)."""
    grid_prompts: int = Field(8, ge=0)
    """Prompts per group shown as grids in the report."""
    guidance_sweep: tuple[float, ...] = ()
    """Guidance scales at which the first `sweep_prompts` seen-one and heldout-one prompts are drawn
    again: whole-caption accuracy against the scale in `metrics.json` and the report. Empty: none."""
    sweep_prompts: int = Field(4, ge=1)
    """Prompts of each one-object group in the guidance sweep."""

    @model_validator(mode="after")
    def _some(self) -> EvaluateSection:
        if not (self.seen_one + self.heldout_one + self.seen_two + self.heldout_two + self.paraphrased):
            raise ValueError("the prompt set is empty: every group count is 0")
        if any(not 0 <= s <= 100 for s in self.guidance_sweep):
            raise ValueError(f"guidance_sweep: every scale must be in [0, 100], got {list(self.guidance_sweep)}")
        if self.guidance_sweep and not self.seen_one + self.heldout_one:
            raise ValueError("guidance_sweep needs one-object prompts (seen_one or heldout_one > 0)")
        return self
