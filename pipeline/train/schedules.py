"""Schedules as pure functions of the update step (so a resumed run recomputes them exactly)."""

from __future__ import annotations

import math

from pipeline.config.models import TrainConfig


def cosine(start: float, end: float, step: int, steps: int) -> float:
    """Cosine interpolation from `start` (step 0) to `end` (step >= `steps`); the paper anneals
    the dVAE temperature (1 -> 1/16) and raises the KL weight (0 -> 6.6) this way."""
    t = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cosine(cfg.lr, cfg.min_lr, step - cfg.warmup_steps, max(cfg.steps - cfg.warmup_steps, 1))
