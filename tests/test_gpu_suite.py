"""The GPU suite (benchmarks/gpu_suite.py) in its --tiny mode on CPU, with the packages the GPU
machine lacks made unimportable: every section runs, without Ray, before it ever meets a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine does not have and the suite must not need (DeepSpeed and pydantic travel as wheels)
ABSENT = ("ray", "wandb", "webdataset", "img2dataset", "py3langid")

BLOCKER = f"""
import sys


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")


sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path_factory.mktemp("suite")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((out / "gpu_suite.json").read_text())
    return done, report, out


def test_the_blocker_really_hides_ray(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "not installed on the GPU machine" in done.stderr


@pytest.mark.slow  # the suite's tiny run: about a minute
def test_every_section_runs_without_ray(suite):
    done, report, out = suite
    failed = {name: r.get("error") for name, r in report["sections"].items() if not r["ok"]}
    assert done.returncode == 0 and not failed, failed
    assert set(report["sections"]) == {
        "pytest", "train_small", "train_1.3b", "train_loop", "encode", "sample_small", "sample_1.3b", "shapes"
    }  # fmt: skip
    for name, record in report["sections"].items():
        assert (out / record["log"]).stat().st_size > 0, name
    # on CPU every gpu test is collected and skipped (none fails to import without Ray)
    assert "skipped" in report["sections"]["pytest"]["summary"]
    assert "error" not in report["sections"]["pytest"]["summary"]


@pytest.mark.slow  # the suite's tiny run: about a minute
def test_the_sections_measure_what_the_targets_read(suite):
    _, report, _ = suite
    sections = {name: r["figures"] for name, r in report["sections"].items() if name != "pytest"}
    train = sections["train_small"]["results"]
    assert set(train) == {"sdpa", "sdpa+compile"}  # no FlexAttention backward on CPU
    # compiled blocks compute the same function: the same loss from the same weights and batch
    assert train["sdpa+compile"]["loss"] == pytest.approx(train["sdpa"]["loss"], rel=1e-4)
    for result in [*train.values(), *sections["train_1.3b"]["results"].values()]:
        assert result["tokens_per_s"] > 0 and math.isfinite(result["loss"])
    assert sections["encode"]["images_per_s"]["encode_pass"] > 0
    for name in ("sample_small", "sample_1.3b"):
        assert sections[name]["cached_vs_recompute"]["speedup"] > 0 and sections[name]["seconds"]["total"] > 0
    shapes = sections["shapes"]
    assert set(shapes["seconds"]) == {"data", "dvae", "clip", "encode", "train", "evaluate"}
    assert set(shapes["losses"]) == {"dvae", "clip", "transformer"}
    assert "heldout_image_loss" in shapes["losses"]["transformer"]
    assert [p["guidance"] for p in shapes["guidance_sweep"]] == [1.0, 3.0]
    targets = report["targets"]
    assert len(targets) == 5 and all(t["met"] is None for t in targets)  # --tiny judges nothing
    assert {t["target"] for t in targets if t["value"] is not None} >= {
        "encode images/s (dVAE + CLIP B/32, one pass)", "KV cache over recomputation (1.3b)"
    }  # fmt: skip


def test_the_section_limits_fit_the_budget(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_suite

    limits = [limit for _, limit in gpu_suite.sections(False, tmp_path).values()]
    assert sum(limits) <= gpu_suite.BUDGET, (sum(limits), gpu_suite.BUDGET)


@pytest.mark.slow  # the suite's tiny run: about a minute
def test_the_train_loop_section_resumes_a_sigkilled_run_exactly(suite):
    _, report, _ = suite
    loop = report["sections"]["train_loop"]["figures"]
    assert loop["resume_matches"] and loop["resumed_from"] == [2]
    assert loop["largest_rel_difference"] == 0.0 and loop["largest_weight_difference"] == 0.0
    assert loop["parameters_kept_whole"] == 0
