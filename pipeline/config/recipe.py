"""The recipe: YAML in, typed and frozen config objects out, with `a.b=value` overrides.

Every field has a docstring (it becomes the field's description in `schemas/recipe.json`).
Unknown keys, wrong types and impossible values raise `RecipeError` with one line naming the
field, before any work is done.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config.base import Config
from pipeline.config.data import FilterSection, IngestSection, TextTokenizerSection
from pipeline.config.generation import EvaluateSection, SampleSection
from pipeline.config.models import ClipSection, DVAESection, EncodeSection, TransformerSection
from pipeline.errors import RecipeError


class RaySection(Config):
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
    gpu_wait_s: float | None = Field(1800.0, gt=0)
    """Seconds a stage that asks for GPUs (`gpus_per_actor`, `use_gpu`) waits for a cluster
    without them to get them (an autoscaler starting GPU nodes takes minutes) before it stops with
    one line; null waits without limit. A Ray this process started itself (no address) has no
    autoscaler: there a GPU ask it cannot hold is refused at once."""


class Recipe(Config):
    """A whole run: where it writes, where it runs, and each stage's settings."""

    name: str = Field(min_length=1)
    """Run name (used for W&B and job names)."""
    output_dir: str = Field(min_length=1)
    """fsspec URL under which each stage writes `<output_dir>/<stage>/`; relative paths are relative
    to the working directory."""
    ray: RaySection = RaySection()
    """Ray settings."""
    wandb_project: str | None = None
    """W&B project of the stages that do not train (ingest, filter, text-tokenizer, encode, sample):
    one run per stage with throughput, counts, drop reasons and example images. Null: no W&B run
    for them (their figures stay in the ledgers). Training stages set their own."""
    ingest: IngestSection
    """Ingest stage."""
    filter: FilterSection = FilterSection()
    """Filter stage."""
    text_tokenizer: TextTokenizerSection = TextTokenizerSection()
    """Text-tokenizer stage."""
    dvae: DVAESection = DVAESection()
    """dVAE stage: train the image tokenizer, or check given weights."""
    clip: ClipSection = ClipSection()
    """CLIP stage: train a CLIP on the filtered pairs, or check given weights."""
    encode: EncodeSection = EncodeSection()
    """Encode stage: image tokens, text tokens and CLIP embeddings per filtered shard."""
    transformer: TransformerSection = TransformerSection()
    """Train stage: the DALL·E transformer trained on the encoded shards."""
    sample: SampleSection | None = None
    """Sample stage: reranked images for a prompt list; null skips it."""
    evaluate: EvaluateSection | None = None
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
