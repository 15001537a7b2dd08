"""Named Ray metrics of a run (`ray.util.metrics`), shown by the Ray dashboard's metrics view and
scraped by Prometheus from each node's metrics endpoint as `ray_dalle_*`.

Recorded by the driver as shards commit and training steps advance; every series is tagged with
the recipe name and the stage. Nothing is recorded before Ray is initialised.
"""

from __future__ import annotations

from typing import Any

TAGS = ("recipe", "stage")


class StageMetrics:
    """The gauges and counters of one run's stages."""

    def __init__(self, recipe: str):
        from ray.util.metrics import Counter, Gauge

        self.recipe = recipe
        self.shards_done = Gauge("dalle_stage_shards_done", "shards committed (training: updates done)", TAGS)
        self.shards_total = Gauge("dalle_stage_shards_total", "shards planned (training: updates asked for)", TAGS)
        self.throughput = Gauge("dalle_stage_samples_per_second", "samples per second of the stage", TAGS)
        self.samples = Counter("dalle_stage_samples", "samples read (kind=in) and written (kind=out)", (*TAGS, "kind"))
        self.drops = Counter("dalle_stage_drops", "samples dropped or failed, by reason", (*TAGS, "reason"))
        self.failures = Counter("dalle_stage_shard_failures", "shard tasks that gave up after their retries", TAGS)

    def _tags(self, stage: str, **extra: str) -> dict[str, str]:
        return {"recipe": self.recipe, "stage": stage, **extra}

    def planned(self, stage: str, total: int, done: int) -> None:
        self.shards_total.set(total, tags=self._tags(stage))
        self.shards_done.set(done, tags=self._tags(stage))

    def progressed(self, stage: str, done: int, samples_per_s: float | None) -> None:
        self.shards_done.set(done, tags=self._tags(stage))
        if samples_per_s is not None:
            self.throughput.set(samples_per_s, tags=self._tags(stage))

    def committed(self, stage: str, record: Any) -> None:
        """A shard's ledger record: its sample counts and per-reason counts."""
        for kind, n in (("in", record.samples_in), ("out", record.samples_out)):
            if n:
                self.samples.inc(n, tags=self._tags(stage, kind=kind))
        for reason, n in record.counts.items():
            if n:
                self.drops.inc(n, tags=self._tags(stage, reason=reason))

    def failed(self, stage: str) -> None:
        self.failures.inc(1, tags=self._tags(stage))
