"""The stage DAG and its execution: fingerprint checks first, then each stage in order on Ray.

Before any work, every selected stage's fingerprint (config + input identity + upstream
fingerprints) is compared with the one kept beside its output; a mismatch is refused unless the
stage is forced. `--force STAGE` clears that stage and everything downstream of it. A folder
written by an older release still matches when the only difference is a recipe field added since
at the value that does what that release did (`Config.added_fields`); it keeps its fingerprint
and digest, so its downstream stages match too.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Collection
from typing import Any

from pipeline import storage
from pipeline.cluster.driver import init_ray
from pipeline.config.recipe import Recipe
from pipeline.engine.ledger import Fingerprint
from pipeline.engine.resources import refuse_impossible
from pipeline.errors import InputError
from pipeline.observe.metrics import StageMetrics
from pipeline.observe.progress import StageProgress
from pipeline.observe.stage_runs import StageRuns
from pipeline.stages.base import RunContext, Stage, StageStatus

log = logging.getLogger(__name__)

# Stage name -> "module:Class", in an order that respects the DAG; imported lazily.
STAGES: dict[str, str] = {
    "ingest": "pipeline.stages.ingest:IngestStage",
    "filter": "pipeline.stages.filter:FilterStage",
    "text-tokenizer": "pipeline.stages.text_tokenizer:TextTokenizerStage",
    "dvae": "pipeline.stages.dvae:DVAEStage",
    "clip": "pipeline.stages.clip:ClipStage",
    "encode": "pipeline.stages.encode:EncodeStage",
    "train": "pipeline.stages.train:TrainStage",
    "sample": "pipeline.stages.sample:SampleStage",
    "evaluate": "pipeline.stages.evaluate:EvaluateStage",
}


def stage_name(text: str) -> str:
    """Accepts `text_tokenizer` or `text-tokenizer`; raises InputError for unknown names."""
    name = text.replace("_", "-")
    if name not in STAGES:
        raise InputError(f"unknown stage '{text}'; stages are: {', '.join(STAGES)}")
    return name


def stage_class(name: str) -> type[Stage]:
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_stages(recipe: Recipe) -> list[Stage]:
    """The recipe's stages in DAG order; optional ones (sample, evaluate) only when their section is set."""
    output_dir = storage.absolute(recipe.output_dir)
    classes = [stage_class(name) for name in STAGES]
    return [cls(recipe, output_dir) for cls in classes if getattr(recipe, cls.config_key) is not None]


def downstream(stages: list[Stage], roots: set[str]) -> set[str]:
    """`roots` and every stage that reads from them, directly or not."""
    out = set(roots)
    for stage in stages:  # STAGES is in DAG order, so one pass suffices
        if out.intersection(stage.upstream):
            out.add(stage.name)
    return out


def fingerprints(stages: list[Stage], checked: Collection[str] = ()) -> dict[str, Fingerprint]:
    """Each stage's fingerprint; inspects external inputs (raises InputError), writes nothing.
    A stage named in `checked` is compared with the fingerprint its folder holds (raises
    FingerprintMismatch) and takes that one: the digest its downstream stages record is its
    folder's, whichever release wrote it (see `Ledger.check`)."""
    fps: dict[str, Fingerprint] = {}
    for stage in stages:
        inputs = stage.inspect_inputs()
        fp = stage.fingerprint({u: fps[u].digest for u in stage.upstream}, inputs)
        fps[stage.name] = stage.ledger.check(fp, stage.name) if stage.name in checked else fp
    return fps


def prepare(recipe: Recipe, force: list[str] = (), until: str | None = None) -> tuple[list[Stage], dict, set[str]]:
    """The stages to run, their fingerprints and the set to clear; refuses mismatches."""
    stages = build_stages(recipe)
    # forcing clears downstream stages even past --until: their outputs would be stale
    names = [s.name for s in stages]
    for name in [*force, *([until] if until else [])]:
        if stage_name(name) not in names:
            raise InputError(f"stage '{stage_name(name)}' is not in this recipe (its section is not set)")
    forced = downstream(stages, {stage_name(f) for f in force})
    if until is not None:
        last = names.index(stage_name(until))
        stages = stages[: last + 1]
    fps = fingerprints(stages, checked={s.name for s in stages} - forced)
    return stages, fps, forced


def run(
    recipe: Recipe,
    force: list[str] = (),
    until: str | None = None,
    address: str | None = None,
    show_progress: bool = True,
    worker_logs: bool = False,
) -> dict[str, dict[str, Any]]:
    """Runs the recipe's stages (resuming from their ledgers); returns each stage's stats."""
    stages, fps, forced = prepare(recipe, force, until)
    for stage in build_stages(recipe):
        if stage.name in forced:
            log.info("clearing %s (forced)", stage.url)
            storage.remove_tree(stage.url)
    if all(stage.is_done() for stage in stages):  # a rerun of a finished run: no Ray to start
        log.info("nothing to run: %s complete", ", ".join(s.name for s in stages))
        return {s.name: s.done_stats() for s in stages}
    init_ray(recipe, address, worker_logs)
    # a GPU recipe on a machine whose own Ray can never have the GPUs stops before the first stage
    for stage in stages:
        ask = None if stage.is_done() else stage.gpu_ask()
        if ask is not None:
            refuse_impossible(stage.name, ask)
    results: dict[str, dict[str, Any]] = {}
    runs = StageRuns(
        recipe.name,
        {
            s.name: (s.url, s.wandb_project, s.cfg.model_dump(mode="json"))
            for s in stages
            if (s.wandb_project or s.always_tracked) and not s.tracks_itself
        },
    )
    with StageProgress(enabled=show_progress, metrics=StageMetrics(recipe.name), runs=runs) as progress:
        for stage in stages:
            if stage.is_done():
                results[stage.name] = stage.done_stats()
                progress.start(stage.name, total=1, done=1, track=False)
                continue
            stage.ledger.claim(fps[stage.name], stage.name)
            stage.ledger.clear_tmp()
            started = time.monotonic()
            stats = stage.run(RunContext(progress=progress, fingerprint=fps[stage.name]))
            stage.check_failed_share(stats)  # warns, or fails with its shards kept
            stage.write_done(stats, time.monotonic() - started)
            results[stage.name] = stage.done_stats()
            log.info("%s done in %.1f s: %s", stage.name, time.monotonic() - started, stats)
    return results


def status(recipe: Recipe) -> list[StageStatus]:
    """Each stage's status, read from its folder (no Ray needed)."""
    return [stage.status() for stage in build_stages(recipe)]
