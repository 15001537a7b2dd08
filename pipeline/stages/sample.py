"""sample: for each prompt of the recipe's list, `candidates` images from the trained transformer,
reranked by CLIP; the best `top` are kept as a grid (`<shard>.png`), as single images
(`<shard>.<rank>.png`) and in `<shard>.json` with every candidate's CLIP score. One shard per prompt.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pipeline.data.images import png_bytes, tile
from pipeline.ledger import ShardRecord
from pipeline.models.generator import ImageGenerator
from pipeline.stages.base import RunContext
from pipeline.stages.generation import GenerationStage, commit_shard, sampling


def sample_shard(gen: ImageGenerator, payload: dict[str, Any]) -> ShardRecord:
    """Draws, reranks and commits one prompt's images."""
    started = time.monotonic()
    shard, prompt, top = payload["shard"], payload["prompt"], payload["top"]
    result = gen.generate(prompt, payload["candidates"], sampling(payload))
    kept = [(int(i), float(result.scores[i]), png_bytes(result.images[i])) for i in result.best(top)]
    files = {f"{shard}.{rank:02d}.png": png for rank, (_, _, png) in enumerate(kept)}
    summary = {
        "prompt": prompt,
        "candidates": payload["candidates"],
        "kept": [{"index": i, "score": round(s, 6), "file": f} for (i, s, _), f in zip(kept, files)],
        "scores": [round(float(s), 6) for s in result.scores],
    }
    files[f"{shard}.png"] = png_bytes(tile(result.images[result.best(top)], payload["grid_columns"]))
    files[f"{shard}.json"] = json.dumps(summary, indent=1).encode()
    return commit_shard(payload, files, started)


class SampleStage(GenerationStage):
    name = "sample"
    config_key = "sample"

    @property
    def wandb_project(self) -> str | None:
        return self.cfg.wandb_project or self.recipe.wandb_project

    shard_fn = "pipeline.stages.sample:sample_shard"

    def run(self, ctx: RunContext) -> dict[str, Any]:
        prompts = [
            (f"{i:05d}", {"prompt": p, "grid_columns": self.cfg.grid_columns}) for i, p in enumerate(self.cfg.prompts)
        ]
        self.run_prompts(ctx, prompts)
        records = self.ledger.done()
        return {
            "shards": len(prompts),
            "samples_in": sum(r.samples_in for r in records.values()),
            "samples_out": sum(r.samples_out for r in records.values()),
        }
