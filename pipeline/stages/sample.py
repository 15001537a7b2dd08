"""sample: for each prompt of the recipe's list, `candidates` images from the trained transformer,
reranked by CLIP; the best `top` are kept as a grid (`<shard>.png`), as single images
(`<shard>.<rank>.png`) and in `<shard>.json` with every candidate's CLIP score. One shard per prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.data.images import png_bytes, tile
from pipeline.engine.ledger import Attempt
from pipeline.engine.tasks import ShardTask
from pipeline.models.generator import ImageGenerator
from pipeline.stages.base import RunContext
from pipeline.stages.generation import GenerationStage


@dataclass(frozen=True)
class SampleTask(ShardTask):
    """One prompt of the recipe's list."""

    prompt: str


class SampleStage(GenerationStage):
    name = "sample"
    config_key = "sample"

    @property
    def wandb_project(self) -> str | None:
        return self.cfg.wandb_project or self.recipe.wandb_project

    def draw(self, gen: ImageGenerator, task: SampleTask, attempt: Attempt) -> None:
        """Draws and reranks one prompt's images."""
        shard, top = task.shard, self.cfg.top
        result = gen.generate(task.prompt, self.cfg.candidates, self.sampling())
        kept = [(int(i), float(result.scores[i]), png_bytes(result.images[i])) for i in result.best(top)]
        names = [f"{shard}.{rank:02d}.png" for rank in range(len(kept))]
        for name, (_, _, png) in zip(names, kept):
            attempt.write(name, png)
        summary = {
            "prompt": task.prompt,
            "candidates": self.cfg.candidates,
            "kept": [{"index": i, "score": round(s, 6), "file": f} for (i, s, _), f in zip(kept, names)],
            "scores": [round(float(s), 6) for s in result.scores],
        }
        attempt.write(f"{shard}.png", png_bytes(tile(result.images[result.best(top)], self.cfg.grid_columns)))
        attempt.write(f"{shard}.json", json.dumps(summary, indent=1).encode())

    def run(self, ctx: RunContext) -> dict[str, Any]:
        tasks = [SampleTask(f"{i:05d}", p) for i, p in enumerate(self.cfg.prompts)]
        records = self.run_prompts(ctx, tasks).values()
        return {
            "shards": len(tasks),
            "samples_in": sum(r.samples_in for r in records),
            "samples_out": sum(r.samples_out for r in records),
        }
