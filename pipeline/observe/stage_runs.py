"""W&B runs of the stages that do not train (ingest, filter, text-tokenizer, encode, sample): one
run per stage, logged by the driver as shards commit.

Each run has the stage's throughput, cumulative sample counts, drops and failures by reason, and
example images: a few captioned images of the stage's first new shard (ingest, filter) or each
committed grid, captioned with its prompt (sample). A run is opened where a W&B project is set (the
recipe's `wandb_project`, or the sample stage's own), and always for sample (offline without a
project, as the training stages); training stages and evaluate keep their own runs.
A rerun continues the stage's run (its id is in `<stage>/tracking.json`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.engine.ledger import Ledger, ShardRecord

log = logging.getLogger(__name__)

EXAMPLES = 8
"""Example images logged per data stage run."""


@dataclass
class _Open:
    tracker: Any
    url: str
    totals: dict[str, float] = field(default_factory=dict)
    examples_logged: bool = False


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def examples(stage_url: str, record: ShardRecord, count: int = EXAMPLES) -> list[tuple[np.ndarray, str]]:
    """Up to `count` (image, caption) pairs from a committed shard: a tar's samples, or a prompt
    shard's grid (`<shard>.png`) captioned with the prompt in `<shard>.json`."""
    from pipeline.data.shards import iter_samples

    out: list[tuple[np.ndarray, str]] = []
    for name in record.files:
        url = storage.join(stage_url, name)
        if name == f"{record.shard}.png":
            info = storage.read_json_or_none(storage.join(stage_url, f"{record.shard}.json")) or {}
            out.append((_decode(storage.read_bytes(url)), info.get("prompt", record.shard)))
        elif name.endswith(".tar"):
            for sample in iter_samples(url):
                image = next((sample[m] for m in ("jpg", "png", "webp") if m in sample), None)
                if image is not None:
                    out.append((_decode(image), sample.get("txt", b"").decode(errors="replace")))
                if len(out) >= count:
                    break
    return out[:count]


class StageRuns:
    """The W&B runs of a run's data stages; `stages` maps a stage name to (url, project, config)."""

    def __init__(self, recipe_name: str, stages: dict[str, tuple[str, str, dict]]):
        self.recipe_name = recipe_name
        self.stages = stages
        self.open: dict[str, _Open] = {}

    def start(self, label: str) -> None:
        if label not in self.stages or label in self.open:
            return
        from pipeline.observe.tracking import Tracker, new_run_id

        url, project, config = self.stages[label]
        previous = storage.read_json_or_none(storage.join(url, "tracking.json")) or {}
        tracker = Tracker(
            url,
            run_id=previous.get("run_id") or new_run_id(),
            name=f"{self.recipe_name}-{label}",
            project=project,
            config=config,
            group=self.recipe_name,
        )
        run = self.open[label] = _Open(tracker, url)
        for record in Ledger(url).done().values():  # what earlier runs committed
            self._add(run, record)

    @staticmethod
    def _add(run: _Open, record: ShardRecord) -> None:
        totals = run.totals
        totals["samples_in"] = totals.get("samples_in", 0) + record.samples_in
        totals["samples_out"] = totals.get("samples_out", 0) + record.samples_out
        for reason, n in record.counts.items():
            totals[f"drops/{reason}"] = totals.get(f"drops/{reason}", 0) + n

    def shard(self, label: str, done: int, samples_per_s: float | None, record: ShardRecord | None) -> None:
        run = self.open.get(label)
        if run is None:
            return
        if record is not None:
            self._add(run, record)
        metrics = {"shards_done": done, **run.totals}
        if samples_per_s is not None:
            metrics["samples_per_s"] = samples_per_s
        run.tracker.log(metrics, step=done)
        if record is not None and (label == "sample" or not run.examples_logged):
            try:
                images = examples(run.url, record)
            except Exception as err:  # noqa: BLE001 - examples are a courtesy, never a failure
                log.warning("%s: no example images from shard %s: %s", label, record.shard, err)
                images = []
            if images:
                run.tracker.log_examples(f"{label}/examples", images, step=done)
                run.examples_logged = True

    def failed(self, label: str, failures: int) -> None:
        run = self.open.get(label)
        if run is not None:
            run.totals["shard_failures"] = failures

    def finish(self, label: str) -> None:
        run = self.open.pop(label, None)
        if run is not None:
            run.tracker.finish()

    def close(self) -> None:
        for label in list(self.open):
            self.finish(label)
