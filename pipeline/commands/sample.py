"""`dalle sample MODEL "prompt" --n 64 --top 8 --out grid.png`: images for one prompt, reranked by CLIP.

MODEL is a trained transformer folder (the train stage's, or `dalle export`'s with `--dvae`,
`--clip` and `--tokenizer`). Writes the grid of the `top` best candidates to `--out`, each of them
as `<out stem>/<rank>.png`, and `<out stem>.json` with their CLIP scores. `--complete IMAGE
--rows R` keeps the top R token rows of IMAGE and samples the rest (image completion).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from pipeline import storage
from pipeline.data.images import decode_rgb, png_bytes, tile
from pipeline.errors import InputError, one_line
from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.models.weight_files import INDEX
from pipeline.stages.sample import completion_image


def _load(model: str, **paths: str) -> ImageGenerator:
    if paths.get("device") == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here")
    url = storage.absolute(model)
    for name in (INDEX, "config.json"):
        if not storage.exists(storage.join(url, name)):
            raise InputError(f"{model}: not a trained transformer folder ({name} missing)")
    try:
        return ImageGenerator.load(url, **paths)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(one_line(err, typed=False)) from None


def sample(
    model: str,
    prompt: str,
    out: str,
    *,
    n: int,
    top: int,
    sampling: SamplingConfig,
    columns: int = 8,
    complete: str | None = None,
    rows: int | None = None,
    **paths: str | None,
) -> dict[str, Any]:
    """Draws `n` candidates, keeps the `top` best by CLIP score and writes them (see the module docstring)."""
    if not prompt.strip():
        raise InputError("the prompt is empty")
    if not 1 <= top <= n:
        raise InputError(f"--top {top} must be between 1 and --n {n}")
    if (complete is None) != (rows is None):
        raise InputError("--complete IMAGE and --rows R go together")
    gen = _load(model, **paths)
    if complete is not None:
        if not 0 <= rows <= gen.dvae.grid:
            raise InputError(f"--rows {rows} must be between 0 and {gen.dvae.grid} (the token grid's rows)")
        image = decode_rgb(completion_image(complete, "--complete"), gen.dvae.image_size)
        result = gen.complete(image, prompt, rows, n, sampling)
    else:
        result = gen.generate(prompt, n, sampling)
    kept = result.best(top)
    out_url = storage.absolute(out)
    stem = os.path.splitext(out_url)[0]
    files = []
    for rank, i in enumerate(kept):
        storage.write_atomic(storage.join(stem, f"{rank:02d}.png"), png_bytes(result.images[i]))
        files.append(
            {"file": f"{os.path.basename(stem)}/{rank:02d}.png", "candidate": int(i), "score": float(result.scores[i])}
        )
    summary = {"prompt": prompt, "candidates": n, "kept": files, "device": str(gen.device)}
    storage.write_atomic(f"{stem}.json", json.dumps(summary, indent=1).encode())
    storage.write_atomic(out_url, png_bytes(tile(result.images[kept], columns)))
    return {**summary, "out": out_url}


def describe(summary: dict[str, Any]) -> str:
    scores = ", ".join(f"{k['score']:.3f}" for k in summary["kept"])
    return (
        f"{len(summary['kept'])} of {summary['candidates']} candidates for {summary['prompt']!r} "
        f"on {summary['device']} -> {summary['out']} (CLIP scores {scores})"
    )
