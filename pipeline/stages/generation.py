"""What the generation stages (sample, evaluate) share: the trained models loaded once per pool
actor, one shard per prompt, the shard's files written into its attempt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.config.generation import GenerationSection
from pipeline.engine.ledger import Attempt, Ledger, ShardRecord, ShardResult
from pipeline.engine.resources import GpuAsk, pool_ask
from pipeline.engine.tasks import Placement, ShardTask, pool_placement
from pipeline.errors import InputError
from pipeline.stages.base import RunContext, Stage, torch_device
from pipeline.stages.train import MODEL_FILES, companions

if TYPE_CHECKING:  # torch's side: the pool actors import it to draw
    from pipeline.models.generator import ImageGenerator, SamplingConfig


def shard_records(url: str) -> list[tuple[str, dict]]:
    """(shard, its `<shard>.json`) for every committed prompt shard of the stage at `url`, in shard order."""
    return [(shard, storage.read_json(storage.join(url, f"{shard}.json"))) for shard in sorted(Ledger(url).done())]


class GenerationStage(Stage):
    """A stage that draws reranked candidates per prompt with the trained transformer."""

    upstream = ("train",)

    def model_url(self) -> str:
        url = self.upstream_url("train")
        missing = [f for f in MODEL_FILES if not storage.exists(storage.join(url, f))]
        if missing:
            raise InputError(f"{url}: no trained transformer ({', '.join(missing)} missing); run the train stage first")
        return url

    def sampling(self) -> SamplingConfig:
        from pipeline.models.generator import SamplingConfig

        cfg: GenerationSection = self.cfg
        return SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, cfg.batch_size, cfg.seed, cfg.guidance)

    def setup(self, placement: Placement) -> None:
        from pipeline.models.generator import ImageGenerator

        device = torch_device(placement)
        paths = companions(self.recipe, self.output_dir)
        self._generator = ImageGenerator.load(self.model_url(), device=device, precision=self.cfg.precision, **paths)

    def process(self, task: ShardTask, attempt: Attempt) -> ShardResult:
        self.draw(self._generator, task, attempt)
        return ShardResult(samples_in=self.cfg.candidates, samples_out=self.cfg.top)

    def draw(self, gen: ImageGenerator, task: ShardTask, attempt: Attempt) -> None:
        """Draws one prompt's candidates and writes the shard's files into `attempt`."""
        raise NotImplementedError

    def run_prompts(self, ctx: RunContext, tasks: Sequence[ShardTask]) -> dict[str, ShardRecord]:
        """Has the pool draw the prompts the ledger does not hold yet."""
        self.write_plan(len(tasks))
        cfg: GenerationSection = self.cfg
        placement = pool_placement(self.config_key, cfg.actors, cfg.gpus_per_actor, self.recipe.ray.cpus_per_task)
        return self.run_shards(ctx, tasks, placement=placement)

    def gpu_ask(self) -> GpuAsk | None:
        return pool_ask(self.config_key, self.recipe.ray.cpus_per_task, self.cfg.gpus_per_actor)
