"""evaluate: generate for a fixed prompt set in the synthetic vocabulary and check every image
against the prompt's ground truth with `pipeline.synthetic.analyzer`.

One shard per prompt (`<shard>.json`: every candidate's CLIP score, what the analyzer read from it
and its per-attribute checks, and which were kept; `<shard>.png`: the kept images). `metrics.json`
holds, per prompt group, the per-attribute and whole-caption accuracy over all candidates ("before"
reranking) and over the kept ones ("after") and the mean CLIP scores; binding and whole-caption
accuracy by the number of objects in the prompt (seed 001: success falls as objects are added);
the colour and shape confusion of the kept one-object images (prompted against read); and, with
`guidance_sweep`, whole-caption accuracy of the one-object prompts at each guidance scale. The
accuracy figures go to W&B.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import storage
from pipeline.config.recipe import Recipe
from pipeline.data.images import png_bytes, tile
from pipeline.engine.ledger import Attempt
from pipeline.engine.tasks import ShardTask
from pipeline.stages.base import RunContext
from pipeline.stages.generation import GenerationStage, shard_records

if TYPE_CHECKING:  # torch's side: the pool actors import it to draw
    from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.synthetic import analyzer
from pipeline.synthetic.dataset import heldout_pairs
from pipeline.synthetic.prompts import GROUPS, Prompt, evaluation_prompts

CHECKS = ("colour", "shape", "size", "position", "count", "relation", "binding", "all")
"""Per image: each attribute of every object, the object count, the pair's relation, `binding`
(every object has both its colour and its shape: attributes bound to the right object) and all."""
READ = ("colour", "shape", "size", "position")
UNREAD = "none"
"""What the confusion tables call an image in which the analyzer found no object."""


def read_and_check(image: np.ndarray, prompt: Prompt) -> tuple[list[list[str]], dict[str, bool]]:
    """What the analyzer reads from one generated image (each object's attributes, `READ` order) and
    its per-attribute verdict for `prompt`."""
    found = analyzer.analyze(image)
    checks = analyzer.score(found, prompt.objects, prompt.relation)
    checks["binding"] = checks["colour"] and checks["shape"]
    return [[getattr(f, a) for a in READ] for f in found], checks


def check(image: np.ndarray, prompt: Prompt) -> dict[str, bool]:
    """The analyzer's per-attribute verdict on one generated image for `prompt`."""
    return read_and_check(image, prompt)[1]


@dataclass(frozen=True)
class EvaluateTask(ShardTask):
    """One prompt of the evaluation set; `guidance` set for a prompt of the guidance sweep."""

    prompt: Prompt
    guidance: float | None = None


def evaluate_prompt(
    gen: ImageGenerator, prompt: Prompt, candidates: int, top: int, sampling: SamplingConfig
) -> tuple[dict, np.ndarray]:
    """Draws, reranks and checks one prompt's candidates: the verdicts (`<shard>.json`) and the
    kept images' grid."""
    result = gen.generate(prompt.text, candidates, sampling)
    kept = result.best(top)
    candidates = []
    for score, image in zip(result.scores, result.images):
        found, checks = read_and_check(image, prompt)
        candidates.append({"score": round(float(score), 6), "found": found, "checks": checks})
    record = {"prompt": prompt.to_dict(), "guidance": sampling.guidance, "kept": [int(i) for i in kept]}
    return {**record, "candidates": candidates}, tile(result.images[kept], len(kept))


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def _candidates(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """Every candidate of `records`, and the kept ones ("before" and "after" reranking)."""
    every = [c for r in records for c in r["candidates"]]
    kept = [r["candidates"][i] for r in records for i in r["kept"]]
    return every, kept


def accuracy(records: Sequence[dict]) -> dict[str, Any]:
    """Per group (and "overall"): prompts, accuracy per check over all candidates ("before") and over
    the kept ones ("after"), mean CLIP score of all and of the kept candidates."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["prompt"]["group"], []).append(rec)
    order = [g for g in GROUPS if g in groups] + sorted(set(groups) - set(GROUPS))
    out = {}
    for name, recs in [(g, groups[g]) for g in order] + [("overall", list(records))]:
        every, kept = _candidates(recs)
        out[name] = {
            "prompts": len(recs),
            "before": {k: _mean([c["checks"][k] for c in every if k in c["checks"]]) for k in CHECKS},
            "after": {k: _mean([c["checks"][k] for c in kept if k in c["checks"]]) for k in CHECKS},
            "clip_score": _mean([c["score"] for c in every]),
            "clip_score_kept": _mean([c["score"] for c in kept]),
        }
    return out


def by_objects(records: Sequence[dict]) -> dict[str, Any]:
    """Binding and whole-caption accuracy before and after reranking, by the prompts' object count."""
    out = {}
    for n in sorted({len(r["prompt"]["objects"]) for r in records}):
        recs = [r for r in records if len(r["prompt"]["objects"]) == n]
        every, kept = _candidates(recs)
        out[str(n)] = {
            "prompts": len(recs),
            **{
                f"{when}_{k}": _mean([c["checks"][k] for c in cs])
                for when, cs in (("before", every), ("after", kept))
                for k in ("binding", "all")
            },
        }
    return out


def confusion(records: Sequence[dict]) -> dict[str, dict[str, dict[str, int]]]:
    """For colour and shape: prompted -> read -> count over the kept images of one-object prompts
    (read `UNREAD` when the analyzer found nothing; the largest object when it found two)."""
    out: dict[str, dict[str, dict[str, int]]] = {"colour": {}, "shape": {}}
    for r in records:
        if len(r["prompt"]["objects"]) != 1:
            continue
        truth = r["prompt"]["objects"][0]
        for i in r["kept"]:
            found = r["candidates"][i]["found"]
            for attr, table in out.items():
                read = found[0][READ.index(attr)] if found else UNREAD
                row = table.setdefault(truth[attr], {})
                row[read] = row.get(read, 0) + 1
    return out


def guidance_curve(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Per guidance scale of the sweep: prompts and whole-caption accuracy before and after reranking."""
    out = []
    for scale in sorted({r["guidance"] for r in records}):
        recs = [r for r in records if r["guidance"] == scale]
        every, kept = _candidates(recs)
        before, after = (_mean([c["checks"]["all"] for c in cs]) for cs in (every, kept))
        out.append({"guidance": scale, "prompts": len(recs), "before_all": before, "after_all": after})
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


def recipe_prompts(recipe: Recipe) -> list[Prompt]:
    """The evaluation prompt set of a recipe: its `evaluate` counts over its synthetic set's held-out pairs."""
    cfg = recipe.evaluate
    counts = ("seen_one", "heldout_one", "seen_two", "heldout_two", "paraphrased")
    held = heldout_pairs(recipe.ingest.synthetic)
    return evaluation_prompts(held, seed=cfg.prompt_seed, **{k: getattr(cfg, k) for k in counts})


def sweep_prompts(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    """The guidance sweep's prompts: the first `n` seen-one and the first `n` heldout-one."""
    return [p for group in ("seen-one", "heldout-one") for p in [q for q in prompts if q.group == group][:n]]


class EvaluateStage(GenerationStage):
    name = "evaluate"
    config_key = "evaluate"
    tracks_itself = True

    def draw(self, gen: ImageGenerator, task: EvaluateTask, attempt: Attempt) -> None:
        sampling = self.sampling()
        if task.guidance is not None:
            sampling = dataclasses.replace(sampling, guidance=task.guidance)
        record, grid = evaluate_prompt(gen, task.prompt, self.cfg.candidates, self.cfg.top, sampling)
        if task.guidance is not None:
            record["sweep"] = True
        attempt.write(f"{task.shard}.json", json.dumps(record).encode())
        attempt.write(f"{task.shard}.png", png_bytes(grid))

    def tasks(self) -> list[EvaluateTask]:
        """The prompt set, then each one-object prompt of the sweep at each scale of `guidance_sweep`."""
        prompts = recipe_prompts(self.recipe)
        tasks = [EvaluateTask(f"{i:05d}", p) for i, p in enumerate(prompts)]
        swept = sweep_prompts(prompts, self.cfg.sweep_prompts)
        for scale in self.cfg.guidance_sweep:
            tasks += [EvaluateTask(f"{len(tasks) + i:05d}", p, float(scale)) for i, p in enumerate(swept)]
        return tasks

    def run(self, ctx: RunContext) -> dict[str, Any]:
        tasks = self.tasks()
        self.run_prompts(ctx, tasks)
        records = [record for _, record in shard_records(self.url)]
        main = [r for r in records if not r.get("sweep")]
        metrics = {
            "candidates": self.cfg.candidates,
            "top": self.cfg.top,
            "guidance": self.cfg.guidance,
            "groups": accuracy(main),
            "objects": by_objects(main),
            "confusion": confusion(main),
            "guidance_sweep": guidance_curve([r for r in records if r.get("sweep")]),
        }
        storage.write_json(storage.join(self.url, "metrics.json"), metrics)
        self.track(metrics["groups"])
        overall = metrics["groups"]["overall"]
        return {
            "shards": len(tasks),
            "samples_in": len(tasks) * self.cfg.candidates,
            "samples_out": len(tasks) * self.cfg.top,
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
