"""sample: for each prompt of the recipe's list, `candidates` images from the trained transformer,
reranked by CLIP; the best `top` are kept as a grid (`<shard>.png`), as single images
(`<shard>.<rank>.png`) and in `<shard>.json` with every candidate's CLIP score. One shard per prompt,
then one per image-completion prompt (the top rows of a given image kept, the rest drawn). The
driver logs each grid to the stage's W&B run (offline without a project).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import UnidentifiedImageError

from pipeline import storage
from pipeline.config.generation import SampleSection
from pipeline.data.images import decode_rgb, png_bytes, tile
from pipeline.engine.ledger import Attempt
from pipeline.engine.tasks import ShardTask
from pipeline.errors import InputError
from pipeline.stages.base import RunContext
from pipeline.stages.generation import GenerationStage

if TYPE_CHECKING:  # torch's side: the pool actors import it to draw
    from pipeline.models.generator import ImageGenerator


@dataclass(frozen=True)
class SampleTask(ShardTask):
    """One prompt of the recipe's list, or one completion prompt (`image`, `rows` given)."""

    prompt: str
    image: str | None = None
    rows: int | None = None


def completion_image(url: str, field: str) -> bytes:
    """The bytes of a completion prompt's image, checked to decode; InputError naming `field`."""
    try:
        data = storage.read_bytes(storage.absolute(url))
        decode_rgb(data)
    except FileNotFoundError:
        raise InputError(f"{field}: no such image {url!r}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{field}: {url!r} is not a readable image ({err})") from None
    return data


class SampleStage(GenerationStage):
    name = "sample"
    config_key = "sample"

    always_tracked = True

    @property
    def wandb_project(self) -> str | None:
        return self.cfg.wandb_project or self.recipe.wandb_project

    def inspect_inputs(self) -> dict[str, Any]:
        """Each completion prompt's image must exist and decode, its rows fit the dVAE's grid; their
        contents are part of the fingerprint."""
        cfg: SampleSection = self.cfg
        grid, digests = self.recipe.dvae.grid, []
        for i, item in enumerate(cfg.completions):
            field = f"sample.completions[{i}]"
            if item.rows > grid:
                raise InputError(f"{field}.rows: {item.rows} is more than the dVAE's {grid} token rows")
            digests.append(hashlib.sha256(completion_image(item.image, f"{field}.image")).hexdigest())
        return {"completions": digests} if digests else {}

    def tasks(self) -> list[SampleTask]:
        cfg: SampleSection = self.cfg
        tasks = [SampleTask(f"{i:05d}", p) for i, p in enumerate(cfg.prompts)]
        for c in cfg.completions:
            tasks.append(SampleTask(f"{len(tasks):05d}", c.prompt, c.image, c.rows))
        return tasks

    def draw(self, gen: ImageGenerator, task: SampleTask, attempt: Attempt) -> None:
        """Draws and reranks one prompt's images (completing the given image's top rows if any)."""
        shard, top, n = task.shard, self.cfg.top, self.cfg.candidates
        if task.image is None:
            result = gen.generate(task.prompt, n, self.sampling())
            given = {}
        else:
            image = decode_rgb(completion_image(task.image, "sample.completions"), gen.dvae.image_size)
            result = gen.complete(image, task.prompt, task.rows, n, self.sampling())
            given = {"image": task.image, "rows": task.rows}
        kept = [(int(i), float(result.scores[i]), png_bytes(result.images[i])) for i in result.best(top)]
        names = [f"{shard}.{rank:02d}.png" for rank in range(len(kept))]
        for name, (_, _, png) in zip(names, kept):
            attempt.write(name, png)
        summary = {
            "prompt": task.prompt,
            **given,
            "candidates": self.cfg.candidates,
            "kept": [{"index": i, "score": round(s, 6), "file": f} for (i, s, _), f in zip(kept, names)],
            "scores": [round(float(s), 6) for s in result.scores],
        }
        attempt.write(f"{shard}.png", png_bytes(tile(result.images[result.best(top)], self.cfg.grid_columns)))
        attempt.write(f"{shard}.json", json.dumps(summary, indent=1).encode())

    def run(self, ctx: RunContext) -> dict[str, Any]:
        tasks = self.tasks()
        records = self.run_prompts(ctx, tasks).values()
        return {
            "shards": len(tasks),
            "samples_in": sum(r.samples_in for r in records),
            "samples_out": sum(r.samples_out for r in records),
        }
