"""train: the DALL·E transformer on the encoded shards (Ray Train + DeepSpeed ZeRO).

The model's vocabularies and lengths come from the encode stage's plan (text_len, text_vocab,
image tokens, image vocab); its size from the recipe's preset. The stage commits the final
weights (sharded safetensors in `export_precision`, the EMA's when kept, streamed one gathered
parameter at a time, plus `config.json`: loadable without DeepSpeed by
`pipeline.models.transformer.load_dalle`) and `metrics.json` with the held-out losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import storage
from pipeline.config.recipe import Recipe
from pipeline.engine.ledger import Attempt
from pipeline.errors import InputError
from pipeline.models.layout import INDEX, MODELS_FILE
from pipeline.observe.tracking import read_metrics
from pipeline.stages.base import RunContext
from pipeline.stages.clip import clip_path
from pipeline.stages.model_stage import ModelStage

if TYPE_CHECKING:  # torch's side: imported when the stage trains
    from pipeline.models.transformer import DalleConfig

MODEL_FILES = [INDEX, "config.json"]
"""What every trained transformer folder holds (besides the shards its index names)."""


def companions(recipe: Recipe, output_dir: str) -> dict[str, str]:
    """The dVAE, CLIP and tokenizer a run's encoded shards are made with (named in `models.json`)."""
    return {
        "dvae": storage.join(output_dir, "dvae", "dvae.pt"),
        "clip": clip_path(recipe, output_dir),
        "tokenizer": storage.join(output_dir, "text-tokenizer", "tokenizer.json"),
    }


class TrainStage(ModelStage):
    name = "train"
    config_key = "transformer"
    upstream = ("encode",)
    task = "pipeline.stages.train_task:TransformerTask"
    data_stage = "encode"

    def model_config(self) -> DalleConfig:
        from pipeline.stages.train_task import model_config

        plan = storage.read_json_or_none(storage.join(self.upstream_url("encode"), "_plan.json"))
        if plan is None:
            raise InputError(f"{self.upstream_url('encode')}: no encode plan; run the encode stage first")
        return model_config(plan, self.cfg)

    def build(self, attempt: Attempt, ctx: RunContext) -> int:
        from pipeline.models.weight_files import weight_files  # torch's side, as the task's

        config = {
            "model": self.model_config().to_dict(),
            "eval_batch_size": self.cfg.eval_batch_size,
            "export_precision": self.cfg.export_precision,
            "bpe_dropout": self.recipe.text_tokenizer.bpe_dropout,
            "null_caption_prob": self.cfg.train.null_caption_prob,
            "seed": self.cfg.train.seed,
            "models": companions(self.recipe, self.output_dir),
        }
        trained = self.train(attempt.folder, ctx, config, self.cfg.holdout)
        attempt.adopt(*weight_files(attempt.folder), "config.json", MODELS_FILE)
        return trained

    def score(self, attempt: Attempt) -> dict[str, float]:
        """The held-out losses and throughput of the run's last report (measured by the workers)."""
        lines = read_metrics(storage.join(self.url, "metrics.jsonl"))
        last: dict[str, float] = {}
        for line in lines:
            last.update({k: v for k, v in line.items() if k != "time"})
        keep = ("step", "loss", "text_loss", "image_loss", "tokens_per_s", "samples_per_s", "mfu")
        return {k: v for k, v in last.items() if k in keep or k.startswith("heldout_")}
