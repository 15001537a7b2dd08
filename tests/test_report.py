"""The whole chain at test size: sample and evaluate on the shared encoded and trained runs, then
report.html: every image it shows exists, the accuracy table is the analyzer's verdicts on the
generated images, headless Chromium renders the sample grids pixel for pixel, and a SIGKILLed
evaluate/sample rerun commits exactly the uninterrupted run's shards."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from random import Random

import numpy as np
import pytest
import yaml
from helpers import committed, copy_stages, dalle, kill_run_when, recipe_at
from PIL import Image

from pipeline.stages.evaluate import accuracy, check
from pipeline.synthetic.dataset import render
from pipeline.synthetic.prompts import Prompt
from pipeline.views.page import pct

pytestmark = pytest.mark.slow

UPSTREAM = ["ingest", "filter", "text-tokenizer", "dvae", "clip", "encode"]
SAMPLE = {"prompts": ["a large red circle on the left", "a small cyan star at the top"], "candidates": 8, "top": 4}
EVALUATE = {
    "candidates": 6,
    "top": 2,
    "batch_size": 3,
    "seen_one": 3,
    "heldout_one": 2,
    "seen_two": 2,
    "heldout_two": 1,
    "paraphrased": 2,
    "grid_prompts": 2,
    "guidance_sweep": [1.0, 3.0],
    "sweep_prompts": 1,
}


class _Page(HTMLParser):
    """The report's image sources and table cells (table id -> rows of cell texts)."""

    def __init__(self):
        super().__init__()
        self.images, self.tables, self._table, self._cell = [], {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table is not None:
            self._table[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._table = None


COMPLETE = "a large red circle on the left"
"""The caption of the completion prompt, whose top rows come from a render of it."""


def _recipe(tmp_path, run):
    recipe, out = recipe_at(tmp_path, run, UPSTREAM)
    data = yaml.safe_load(recipe.read_text())
    image, _ = render([{"colour": "red", "shape": "circle", "size": "large", "position": "left"}], 64, Random(1))
    image.save(tmp_path / "start.png")
    completion = {"prompt": COMPLETE, "image": str(tmp_path / "start.png"), "rows": 3}
    data["sample"], data["evaluate"] = {**SAMPLE, "completions": [completion]}, EVALUATE
    recipe.write_text(yaml.safe_dump(data))
    return recipe, out


@pytest.fixture(scope="module")
def full(tmp_path_factory, run, trained):
    """An uninterrupted run of sample and evaluate after the shared encoded run and its shared
    training (conftest's `trained`: this recipe's stages through train are the same)."""
    recipe, out = _recipe(tmp_path_factory.mktemp("report"), run)
    copy_stages(trained, out, ["train"])
    result = dalle("run", str(recipe), "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report: " in result.stdout
    return out, recipe


def _records(stage_dir):
    return [json.loads((stage_dir / f"{s}.json").read_text()) for s in committed(stage_dir)]


def test_report_images_exist_and_accuracy_is_measured(full):
    out, _ = full
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert len(page.images) >= 1 + 1 + 2 + 2  # curves, reconstructions, 2 sample grids, evaluate grids
    for src in page.images:
        with Image.open(out / src) as img:
            assert img.size[0] >= 32 and img.size[1] >= 32, src
    assert {"report/loss_curves.png", "report/reconstructions.png", "report/sample_00000.png"} <= set(page.images)
    stages = {row[0]: row for row in page.tables["stages"][1:]}
    assert list(stages) == [*UPSTREAM, "train", "sample", "evaluate"]
    assert all(row[1] == "complete" for row in stages.values())

    # every kept image's verdict in the shard records is the analyzer's on the committed grid's pixels
    everything = _records(out / "evaluate")
    records = [r for r in everything if not r.get("sweep")]
    assert len(records) == 10 and len(everything) == 10 + 2 * 2  # the sweep: 2 scales x 2 one-object prompts
    for shard, rec in zip(committed(out / "evaluate"), everything):
        grid = np.asarray(Image.open(out / "evaluate" / f"{shard}.png").convert("RGB"))
        prompt = Prompt.from_dict(rec["prompt"])
        assert len(rec["candidates"]) == 6 and len(rec["kept"]) == 2
        for col, i in enumerate(rec["kept"]):
            x = 2 + col * 66
            assert check(grid[2:66, x : x + 64], prompt) == rec["candidates"][i]["checks"]
        scores = [c["score"] for c in rec["candidates"]]
        assert sorted(scores, reverse=True)[:2] == [scores[i] for i in rec["kept"]]

    # the table shows metrics.json, which is the summary of those verdicts
    metrics = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert metrics["groups"] == accuracy(records)
    table = page.tables["accuracy"]
    assert [row[0] for row in table[1:]] == [
        "seen-one",
        "heldout-one",
        "seen-two",
        "heldout-two",
        "paraphrased",
        "overall",
    ]
    for row in table[1:]:
        group = metrics["groups"][row[0]]
        assert row[1] == str(group["prompts"])
        assert row[2:4] == [pct(group["before"]["all"]), pct(group["after"]["all"])]
        assert row[-2:] == [f"{group['clip_score']:.3f}", f"{group['clip_score_kept']:.3f}"]

    # binding by object count, the confusion of the kept one-object images, the guidance sweep
    assert {"report/objects.png", "report/guidance.png"} <= set(page.images)
    assert [row[0] for row in page.tables["objects"][1:]] == ["1", "2"]
    assert [row[1] for row in page.tables["objects"][1:]] == ["7", "3"]
    for attr in ("colour", "shape"):
        cells = [int(c) for row in page.tables[f"confusion-{attr}"][1:] for c in row[1:]]
        assert sum(cells) == 7 * 2  # seen-one 3 + heldout-one 2 + paraphrased 2 prompts, 2 kept each
    assert [row[:2] for row in page.tables["guidance"][1:]] == [["1", "2"], ["3", "2"]]
    sweep = {p["guidance"]: p for p in metrics["guidance_sweep"]}
    assert page.tables["guidance"][2][3] == pct(sweep[3.0]["after_all"])


def _screenshot(page, png, height: int = 4000):
    """Headless Chromium's screenshot of `page` (a URL, or an HTML file) at 1280 x `height`."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make test` installs Debian's chromium package")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1"]
    flags += ["--force-color-profile=srgb", f"--window-size=1280,{height}", f"--screenshot={png}"]
    flags += [f"--user-data-dir={Path(png).parent / 'chromium-profile'}"]  # its own, beside other tests' browsers
    url = str(page) if "://" in str(page) else f"file://{page}"
    subprocess.run([chromium, *flags, url], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB"))


def _shown(shot, image):
    """Whether `image` appears in the screenshot pixel for pixel at twice its size (the report's zoom)."""
    up = image.repeat(2, 0).repeat(2, 1)
    probe = up[up.shape[0] // 2].tobytes()
    for y in range(shot.shape[0] - up.shape[0] + 1):
        x = shot[y].tobytes().find(probe)
        if x >= 0 and x % 3 == 0:
            top, left = y - up.shape[0] // 2, x // 3
            if top >= 0 and np.array_equal(shot[top : top + up.shape[0], left : left + up.shape[1]], up):
                return True
    return False


def test_sample_stage_completes_images_and_logs_its_grids_to_wandb(full):
    out, recipe = full
    records = _records(out / "sample")
    assert [r["prompt"] for r in records] == [*SAMPLE["prompts"], COMPLETE]
    assert "image" not in records[0] and (records[2]["image"], records[2]["rows"]) == (
        str(recipe.parent / "start.png"),
        3,
    )
    assert len(records[2]["scores"]) == 8 and len(records[2]["kept"]) == 4
    # no wandb_project in the recipe: the grids still go to an offline run under the stage folder
    info = json.loads((out / "sample" / "tracking.json").read_text())
    assert info["mode"] == "offline"
    (run,) = (out / "sample" / "wandb").glob(f"offline-run-*-{info['run_id']}")
    assert len(list(run.rglob("media/images/**/*.png"))) == 3  # one grid per prompt
    logged = next(run.glob("*.wandb")).read_bytes()
    assert all(p.encode() in logged for p in SAMPLE["prompts"])


def test_a_bad_completion_prompt_is_one_line_before_anything_runs(full, tmp_path):
    _, recipe = full
    for change, message in (
        ({"image": str(tmp_path / "nope.png")}, f"sample.completions[0].image: no such image '{tmp_path}/nope.png'"),
        ({"image": str(recipe)}, "sample.completions[0].image: "),
        ({"rows": 9}, "sample.completions[0].rows: 9 is more than the dVAE's 8 token rows"),
    ):
        data = yaml.safe_load(recipe.read_text())
        data["sample"]["completions"][0].update(change)
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data))
        result = dalle("run", str(bad), "--no-progress")
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
        assert message in result.stderr


def test_report_renders_in_headless_chromium(full, tmp_path):
    out, _ = full
    shot = _screenshot(out / "report.html", tmp_path / "shot.png")
    grid = np.asarray(Image.open(out / "report" / "sample_00000.png").convert("RGB"))
    assert _shown(shot, grid), "the first sample grid is not on the rendered page"
    first_eval = np.asarray(Image.open(out / "report" / "evaluate_00000.png").convert("RGB"))
    assert _shown(shot, first_eval)
    # the check fails when the image does not load (the page alone is not enough)
    copy = tmp_path / "copy"
    shutil.copytree(out / "report", copy / "report")
    shutil.copy(out / "report.html", copy / "report.html")
    (copy / "report" / "sample_00000.png").unlink()
    assert not _shown(_screenshot(copy / "report.html", tmp_path / "broken.png"), grid)


def test_generation_stages_resume_after_sigkill(full, tmp_path):
    ref, _ = full
    recipe, out = _recipe(tmp_path, (ref, full[1]))
    copy_stages(ref, out, ["train"])
    ledger = out / "evaluate" / "_ledger"
    kill_run_when(
        ["run", str(recipe), "--no-progress"], lambda: ledger.is_dir() and len(list(ledger.glob("*.json"))) >= 3
    )
    assert 3 <= len(list(ledger.glob("*.json"))) < 10
    result = dalle("run", str(recipe), "--no-progress", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("sample", "evaluate"):
        got, want = committed(out / stage), committed(ref / stage)
        assert got == want, f"{stage}: missing {set(want) - set(got)}, extra {set(got) - set(want)}"
        # (the completion's image is named by its path, which differs between the two runs' folders)
        same = [[{k: v for k, v in r.items() if k != "image"} for r in _records(d / stage)] for d in (out, ref)]
        assert same[0] == same[1]
        for shard in want:
            assert (out / stage / f"{shard}.png").read_bytes() == (ref / stage / f"{shard}.png").read_bytes()
    assert json.loads((out / "evaluate" / "metrics.json").read_text()) == json.loads(
        (ref / "evaluate" / "metrics.json").read_text()
    )
