"""Named Ray metrics of a run (`ray.util.metrics`), shown by the Ray dashboard's metrics view and
scraped by Prometheus from each node's metrics endpoint as `ray_dalle_*`.

Recorded by the driver as shards commit and training steps advance; every series is tagged with
the recipe name and the stage. Nothing is recorded before Ray is initialised. Ray drops a gauge
that was not set again within two report intervals, so the gauges' last values are set again
every second until the run ends.
"""

from __future__ import annotations

import threading
from typing import Any

TAGS = ("recipe", "stage")
REFRESH_S = 1.0


class StageMetrics:
    """The gauges and counters of one run's stages."""

    def __init__(self, recipe: str):
        from ray.util.metrics import Counter, Gauge

        self.recipe = recipe
        self.shards_done = Gauge("dalle_stage_shards_done", "shards committed (training: updates done)", TAGS)
        self.shards_planned = Gauge("dalle_stage_shards_planned", "shards planned (training: updates asked for)", TAGS)
        self.throughput = Gauge("dalle_stage_samples_per_second", "samples per second of the stage", TAGS)
        self.samples = Counter("dalle_stage_samples", "samples read (kind=in) and written (kind=out)", (*TAGS, "kind"))
        self.drops = Counter("dalle_stage_drops", "samples dropped or failed, by reason", (*TAGS, "reason"))
        self.failures = Counter("dalle_stage_shard_failures", "shard tasks that gave up after their retries", TAGS)
        self._gauges: dict[tuple[str, str], tuple[Any, float, dict]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._refresh, name="dalle-metrics", daemon=True).start()

    def _set(self, gauge: Any, value: float, stage: str) -> None:
        tags = self._tags(stage)
        gauge.set(value, tags=tags)
        with self._lock:
            self._gauges[(gauge.info["name"], stage)] = (gauge, value, tags)

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            with self._lock:
                live = list(self._gauges.values())
            for gauge, value, tags in live:
                gauge.set(value, tags=tags)

    def close(self) -> None:
        self._stop.set()

    def _tags(self, stage: str, **extra: str) -> dict[str, str]:
        return {"recipe": self.recipe, "stage": stage, **extra}

    def planned(self, stage: str, total: int, done: int) -> None:
        self._set(self.shards_planned, total, stage)
        self._set(self.shards_done, done, stage)

    def progressed(self, stage: str, done: int, samples_per_s: float | None) -> None:
        self._set(self.shards_done, done, stage)
        if samples_per_s is not None:
            self._set(self.throughput, samples_per_s, stage)

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
