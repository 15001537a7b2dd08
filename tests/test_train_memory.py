"""benchmarks/train_memory.py at ≈350M parameters (ZeRO-3, CPU, gloo, a 5e7 reduce bucket so two
ranks fit a 24 GB machine): the model states halve on 2
ranks (each rank's peak at most 0.75x the 1-rank peak) and `dalle plan`'s per-rank prediction is
within 25% of the measured peak at both sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ENV, ROOT

pytestmark = pytest.mark.slow


def _measure(workers: int) -> dict:
    cmd = [
        sys.executable,
        "benchmarks/train_memory.py",
        "small",
        "--layers",
        "24",
        "--heads",
        "16",
        "--reduce-bucket",
        "5e7",
    ]
    result = subprocess.run(
        [*cmd, "--workers", str(workers), "--json"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))


def test_two_ranks_hold_half_the_model_states_and_the_plan_predicts_the_peak():
    one, two = _measure(1), _measure(2)
    assert 3.4e8 < one["params"] == two["params"] < 3.7e8
    assert set(one["phases"]) == {"build", "train", "evaluate", "checkpoint", "export"}
    assert len(two["ranks"]) == 2 and two["peak_rss_gb"] == max(two["phases"].values())
    assert two["peak_rss_gb"] <= 0.75 * one["peak_rss_gb"], (one, two)
    for figures in (one, two):
        assert abs(figures["plan_host_gb_per_rank"] / figures["peak_rss_gb"] - 1) <= 0.25, figures
