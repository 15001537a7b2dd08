"""The recipe: YAML in, typed and frozen config objects out, with `a.b=value` overrides.

Every field has a docstring (it becomes the field's description in `schemas/recipe.json`).
Unknown keys, wrong types and impossible values raise `RecipeError` with one line naming the
field, before any work is done.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config_base import Config as _Config
from pipeline.config_generation import EvaluateConfig, SampleConfig
from pipeline.config_models import ClipConfig, DVAEConfig, EncodeConfig, TransformerConfig


class RecipeError(ValueError):
    """A recipe (or an override) that cannot be used; the message is one line for the user."""


class SyntheticConfig(_Config):
    """The embedded captioned-shapes dataset, served over a loopback HTTP server."""

    count: int = Field(400, ge=10, le=1_000_000)
    """Number of clean rendered image-caption pairs (the crawl defects are added on top)."""
    seed: int = 0
    """Seed for everything random in the dataset; the same seed gives the same bytes."""
    image_size: int = Field(96, ge=32, le=1024)
    """Side in pixels of the rendered (square) images before ingest resizes them."""
    two_object_fraction: float = Field(0.4, ge=0.0, le=1.0)
    """Fraction of clean samples that show two objects and a relation between them."""
    defect_fraction: float = Field(0.25, ge=0.0, le=2.0)
    """Number of crawl-defect rows (dead hosts, 404s, duplicates, bad captions...) per clean row."""
    heldout_pairs: int = Field(3, ge=0, le=20)
    """Number of (colour, shape) combinations never shown in the training data, kept for evaluation."""
    latency_ms: float = Field(0.0, ge=0, le=10_000)
    """Delay the server adds to every answer, to mimic slow hosts (tests, benchmarks)."""
    port: int = Field(0, ge=0, le=65535)
    """Loopback port of the server; 0 picks a free one (kept in the source folder for resumes)."""


class IngestConfig(_Config):
    """Download URL lists into raw webdataset shards with img2dataset."""

    url_lists: tuple[str, ...] = ()
    """URL list files (parquet, csv or tsv; local paths or fsspec URLs). Empty when `synthetic` is set."""
    url_col: str = "url"
    """Column holding the image URL in the URL lists."""
    caption_col: str = "caption"
    """Column holding the caption in the URL lists."""
    extra_cols: tuple[str, ...] = ()
    """More URL-list columns to keep in each sample's json (e.g. `license`)."""
    synthetic: SyntheticConfig | None = None
    """Generate and serve the synthetic dataset instead of reading `url_lists`."""
    image_size: int = Field(256, ge=8, le=4096)
    """Side in pixels of the stored images."""
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    """img2dataset resize mode."""
    encode_quality: int = Field(95, ge=1, le=100)
    """JPEG quality of the stored images."""
    shard_size: int = Field(10_000, ge=1, le=1_000_000)
    """URL-list rows per shard (one shard task each)."""
    threads: int = Field(64, ge=1, le=1024)
    """Download threads per shard task."""
    timeout_s: float = Field(10.0, gt=0)
    """Per-URL download timeout in seconds."""
    retries: int = Field(0, ge=0, le=10)
    """Download retries per URL."""
    max_task_retries: int = Field(2, ge=0, le=100)
    """Times a failed shard task is retried before the stage fails."""

    @model_validator(mode="after")
    def _one_source(self) -> IngestConfig:
        if self.synthetic is None and not self.url_lists:
            raise ValueError("give either url_lists or synthetic")
        if self.synthetic is not None and self.url_lists:
            raise ValueError("give url_lists or synthetic, not both")
        return self


DEFAULT_BOILERPLATE = (
    r"^\s*(img|dsc|dscn|dcim|pxl|image|photo|p)[-_ ]?\d+(\.\w{2,4})?\s*$",
    r"\.(jpe?g|png|gif|webp|bmp|tiff?)\s*$",
    r"\b(photographed|taken|captured|uploaded|posted) on \d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b",
    r"^\s*(untitled|no caption|image|photo|picture|stock photo|thumbnail)\s*$",
    r"\bstock (photo|image|illustration)\b",
)


class FilterConfig(_Config):
    """The paper's caption and image rules, dedup, and re-sharding of the survivors."""

    min_caption_words: int = Field(3, ge=0)
    """Captions with fewer words are dropped (`caption_too_short`; empty ones are `caption_empty`)."""
    max_caption_words: int = Field(200, ge=1)
    """Captions with more words are dropped (`caption_too_long`)."""
    languages: tuple[str, ...] = ("en",)
    """ISO 639-1 codes kept by the language identifier (py3langid); empty keeps every language."""
    min_language_confidence: float = Field(0.5, ge=0.0, le=1.0)
    """A caption is dropped as `non_english` only when another language wins with this probability."""
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE
    """Case-insensitive regexes; a caption matching any is dropped (`boilerplate`)."""
    min_aspect_ratio: float = Field(0.5, gt=0)
    """Original width/height below this is dropped (`aspect_ratio`); the paper keeps [1/2, 2]."""
    max_aspect_ratio: float = Field(2.0, gt=0)
    """Original width/height above this is dropped (`aspect_ratio`)."""
    min_image_size: int = Field(64, ge=0)
    """Images whose original shorter side is below this are dropped (`low_resolution`)."""
    dedup_url: bool = True
    """Drop later samples with an already seen URL (`duplicate_url`)."""
    dedup_exact: bool = True
    """Drop later samples with the same caption and original image bytes (`duplicate_exact`)."""
    near_duplicate_distance: int | None = Field(4, ge=0, le=32)
    """Hamming distance of 64-bit perceptual hashes at or below which an image is a near duplicate
    of an earlier kept one (`near_duplicate`); null turns the check off."""
    shard_size: int = Field(10_000, ge=1, le=1_000_000)
    """Samples per filtered shard (the last one may be smaller)."""

    @model_validator(mode="after")
    def _ranges(self) -> FilterConfig:
        if self.min_aspect_ratio > self.max_aspect_ratio:
            raise ValueError("min_aspect_ratio is above max_aspect_ratio")
        if self.min_caption_words > self.max_caption_words:
            raise ValueError("min_caption_words is above max_caption_words")
        import re

        for pattern in self.boilerplate_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"boilerplate pattern {pattern!r} is not a regex: {err}") from None
        return self


class TextTokenizerConfig(_Config):
    """BPE tokenizer trained on the filtered captions (HF `tokenizers`)."""

    vocab_size: int = Field(16384, ge=64, le=1_000_000)
    """Target vocabulary size (the paper: 16384); a small corpus may stop below it."""
    text_len: int = Field(256, ge=1, le=4096)
    """Text positions per caption (the paper: 256); longer captions are truncated."""
    lowercase: bool = True
    """Lowercase captions before tokenizing (the paper does)."""
    bpe_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """BPE dropout used when encoding for training (the paper: 0.1); 0 at evaluation."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to become a merge."""


class RayConfig(_Config):
    """Where the stages run."""

    address: str | None = None
    """Ray cluster address (`ray://...`, `auto`, `HOST:PORT`); null starts a local Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray instance; null uses the machine's."""
    cpus_per_task: float = Field(1.0, gt=0)
    """CPUs each shard task asks Ray for."""
    shared_filesystem: bool = False
    """A local `output_dir` is on a filesystem every node mounts (NFS); without it a local
    output_dir is refused on a cluster of more than one node."""


class Recipe(_Config):
    """A whole run: where it writes, where it runs, and each stage's settings."""

    name: str = Field(min_length=1)
    """Run name (used for W&B and job names)."""
    output_dir: str = Field(min_length=1)
    """fsspec URL under which each stage writes `<output_dir>/<stage>/`; relative paths are relative
    to the working directory."""
    ray: RayConfig = RayConfig()
    """Ray settings."""
    wandb_project: str | None = None
    """W&B project of the stages that do not train (ingest, filter, text-tokenizer, encode, sample):
    one run per stage with throughput, counts, drop reasons and example images. Null: no W&B run
    for them (their figures stay in the ledgers). Training stages set their own."""
    ingest: IngestConfig
    """Ingest stage."""
    filter: FilterConfig = FilterConfig()
    """Filter stage."""
    text_tokenizer: TextTokenizerConfig = TextTokenizerConfig()
    """Text-tokenizer stage."""
    dvae: DVAEConfig = DVAEConfig()
    """dVAE stage: train the image tokenizer, or check given weights."""
    clip: ClipConfig = ClipConfig()
    """CLIP stage: train a CLIP on the filtered pairs, or check given weights."""
    encode: EncodeConfig = EncodeConfig()
    """Encode stage: image tokens, text tokens and CLIP embeddings per filtered shard."""
    transformer: TransformerConfig = TransformerConfig()
    """Train stage: the DALL·E transformer trained on the encoded shards."""
    sample: SampleConfig | None = None
    """Sample stage: reranked images for a prompt list; null skips it."""
    evaluate: EvaluateConfig | None = None
    """Evaluate stage (synthetic data only): generated images checked against the ground truth;
    null skips it."""

    @model_validator(mode="after")
    def _evaluate_needs_truth(self) -> Recipe:
        if self.evaluate is not None and self.ingest.synthetic is None:
            raise ValueError("evaluate needs ingest.synthetic: the analyzer reads only the synthetic shapes")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    where = f"field '{loc}'" if loc else "recipe"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{shown}{more}"


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (`3`, `true`, `null`, `[a, b]`), else as the string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of `data` with each `a.b.c=value` applied."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key=value, e.g. filter.shard_size=500")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return data


def build_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validates a parsed recipe mapping into a `Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_error(err, source)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Reads a YAML recipe file, applies overrides, validates."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read recipe: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', err)}") from None
    if isinstance(data, dict):
        data = apply_overrides(data, list(overrides))
    return build_recipe(data, str(path))
