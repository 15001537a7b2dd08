"""evaluate: generate for a fixed prompt set in the synthetic vocabulary and check every image
against the prompt's ground truth with `pipeline.synthetic.analyzer`.

One shard per prompt (`<shard>.json`: every candidate's CLIP score and per-attribute checks, and
which were kept; `<shard>.png`: the kept images). `metrics.json` holds, per prompt group, the
per-attribute and whole-caption accuracy over all candidates ("before" reranking) and over the
kept ones ("after"), and the mean CLIP scores; the same figures go to W&B.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.images import png_bytes, tile
from pipeline.engine.ledger import Attempt
from pipeline.engine.tasks import ShardTask
from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.stages.base import RunContext
from pipeline.stages.generation import GenerationStage, shard_records
from pipeline.synthetic import analyzer
from pipeline.synthetic.dataset import heldout_pairs
from pipeline.synthetic.prompts import GROUPS, Prompt, evaluation_prompts

CHECKS = ("colour", "shape", "size", "position", "count", "relation", "all")


def check(image: np.ndarray, prompt: Prompt) -> dict[str, bool]:
    """The analyzer's per-attribute verdict on one generated image for `prompt`."""
    return analyzer.score(analyzer.analyze(image), prompt.objects, prompt.relation)


@dataclass(frozen=True)
class EvaluateTask(ShardTask):
    """One prompt of the evaluation set."""

    prompt: Prompt


def evaluate_prompt(
    gen: ImageGenerator, prompt: Prompt, candidates: int, top: int, sampling: SamplingConfig
) -> tuple[dict, np.ndarray]:
    """Draws, reranks and checks one prompt's candidates: the verdicts (`<shard>.json`) and the
    kept images' grid."""
    result = gen.generate(prompt.text, candidates, sampling)
    kept = result.best(top)
    record = {
        "prompt": prompt.to_dict(),
        "kept": [int(i) for i in kept],
        "candidates": [
            {"score": round(float(s), 6), "checks": check(image, prompt)}
            for s, image in zip(result.scores, result.images)
        ],
    }
    return record, tile(result.images[kept], len(kept))


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def accuracy(records: Sequence[dict]) -> dict[str, Any]:
    """Per group (and "overall"): prompts, accuracy per check over all candidates ("before") and over
    the kept ones ("after"), mean CLIP score of all and of the kept candidates."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["prompt"]["group"], []).append(rec)
    order = [g for g in GROUPS if g in groups] + sorted(set(groups) - set(GROUPS))
    out = {}
    for name, recs in [(g, groups[g]) for g in order] + [("overall", list(records))]:
        every = [c for r in recs for c in r["candidates"]]
        kept = [r["candidates"][i] for r in recs for i in r["kept"]]
        out[name] = {
            "prompts": len(recs),
            "before": {k: _mean([c["checks"][k] for c in every if k in c["checks"]]) for k in CHECKS},
            "after": {k: _mean([c["checks"][k] for c in kept if k in c["checks"]]) for k in CHECKS},
            "clip_score": _mean([c["score"] for c in every]),
            "clip_score_kept": _mean([c["score"] for c in kept]),
        }
    return out


def flat(metrics: dict[str, Any]) -> dict[str, float]:
    """`accuracy`'s nesting as "group/before/all" keys (W&B), without empty cells."""
    out = {}
    for group, m in metrics.items():
        for key in ("clip_score", "clip_score_kept"):
            if m[key] is not None:
                out[f"{group}/{key}"] = m[key]
        for when in ("before", "after"):
            out |= {f"{group}/{when}/{k}": v for k, v in m[when].items() if v is not None}
    return out


class EvaluateStage(GenerationStage):
    name = "evaluate"
    config_key = "evaluate"
    tracks_itself = True

    def draw(self, gen: ImageGenerator, task: EvaluateTask, attempt: Attempt) -> None:
        record, grid = evaluate_prompt(gen, task.prompt, self.cfg.candidates, self.cfg.top, self.sampling())
        attempt.write(f"{task.shard}.json", json.dumps(record).encode())
        attempt.write(f"{task.shard}.png", png_bytes(grid))

    def prompts(self) -> list[Prompt]:
        cfg = self.cfg
        counts = ("seen_one", "heldout_one", "seen_two", "heldout_two", "paraphrased")
        held = heldout_pairs(self.recipe.ingest.synthetic)
        return evaluation_prompts(held, seed=cfg.prompt_seed, **{k: getattr(cfg, k) for k in counts})

    def run(self, ctx: RunContext) -> dict[str, Any]:
        prompts = self.prompts()
        self.run_prompts(ctx, [EvaluateTask(f"{i:05d}", p) for i, p in enumerate(prompts)])
        records = [record for _, record in shard_records(self.url)]
        metrics = {"candidates": self.cfg.candidates, "top": self.cfg.top, "groups": accuracy(records)}
        storage.write_json(storage.join(self.url, "metrics.json"), metrics)
        self.track(metrics["groups"])
        overall = metrics["groups"]["overall"]
        return {
            "shards": len(prompts),
            "samples_in": len(prompts) * self.cfg.candidates,
            "samples_out": len(prompts) * self.cfg.top,
            "accuracy_before": overall["before"]["all"],
            "accuracy_after": overall["after"]["all"],
        }

    def track(self, groups: dict[str, Any]) -> None:
        from pipeline.observe.tracking import Tracker, new_run_id

        tracker = Tracker(
            self.url,
            run_id=new_run_id(),
            name=f"{self.recipe.name}-evaluate",
            project=self.cfg.wandb_project,
            config=self.cfg.model_dump(mode="json"),
        )
        tracker.log(flat(groups), step=0)
        tracker.finish()
