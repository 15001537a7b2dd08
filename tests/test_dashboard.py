"""`dalle dashboard`: the page and `/api/status` built from a real run's stage folders (states,
progress, failures, refresh while incomplete, W&B links, cached curves), and headless Chromium
loading the live page during a run and after it: the stage table's state colours and the embedded
sample grid are found in the screenshot's pixels."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import fsspec
import numpy as np
import pytest
import yaml
from helpers import ENV, ROOT, UPSTREAM, kill_session, recipe_at, session_pids, small_recipe, train_step
from PIL import Image
from test_report import _Page, _shown
from test_report import _screenshot as screenshot

from pipeline import storage
from pipeline.config.recipe import load_recipe
from pipeline.engine.ledger import Ledger
from pipeline.views import dashboard

REFRESH = "<meta http-equiv='refresh' content='5'>"
# the state cells' backgrounds in dashboard.STYLE
PARTIAL, COMPLETE = (255, 230, 153), (198, 239, 206)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _states(html: str) -> dict[str, str]:
    return {row[0]: row[1] for row in _page(html).tables["stages"][1:]}


def _grid_src(html: str) -> bytes | None:
    match = re.search(r"<img id='latest-grid' src='data:image/png;base64,([^']+)'", html)
    return base64.b64decode(match.group(1)) if match else None


def test_empty_run_over_http(tmp_path):
    """No stage has started: all pending, the page refreshes, HTML is escaped, unknown paths 404."""
    path = small_recipe(tmp_path / "recipe.yaml", tmp_path / "out")
    data = yaml.safe_load(path.read_text())
    data["name"] = "demo <b>&'x"
    path.write_text(yaml.safe_dump(data))
    server = dashboard.make_server(load_recipe(path), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, html = _get(base + "/")
        assert status == 200
        html = html.decode()
        assert REFRESH in html
        assert "<title>demo &lt;b&gt;&amp;&#x27;x dashboard</title>" in html and "<b>&'x" not in html
        assert set(_states(html).values()) == {"pending"}
        assert "no Ray dashboard given (--address)" in html and "id='latest-grid'" not in html
        status, body = _get(base + "/api/status")
        facts = json.loads(body)
        assert status == 200 and facts["complete"] is False and facts["refresh_s"] == 5
        assert [r["stage"] for r in facts["stages"]] == [*UPSTREAM, "train", "sample", "evaluate"]
        assert facts["latest_grid"] is None and facts["failures"] == [] and facts["wandb"] == []
        assert _get(base + "/nope")[0] == 404 and _get(base + "/api/status/x")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_page_of_a_real_run(run, tmp_path, monkeypatch):
    recipe_path, out = recipe_at(tmp_path, run, UPSTREAM)
    recipe = load_recipe(recipe_path)
    facts = dashboard.status_json(recipe, "http://head:8265")
    rows = {r["stage"]: r for r in facts["stages"]}
    assert list(rows) == [*UPSTREAM, "train"] and rows["train"]["state"] == "pending"
    assert all(rows[s]["state"] == "complete" for s in UPSTREAM) and facts["refresh_s"] == 5
    assert rows["filter"]["samples_per_s"] > 0 and rows["filter"]["shards_done"] == rows["filter"]["shards_total"]
    assert rows["dvae"]["training"]["step"] == rows["dvae"]["training"]["steps"] == 60
    assert rows["dvae"]["samples_per_s"] > 0
    grid = facts["latest_grid"]
    assert grid["stage"] == "dvae" and grid["url"] == str(out / "dvae" / "reconstructions.png")
    runs = {r["stage"]: r for r in facts["wandb"]}
    assert set(runs) == {"dvae", "clip"}
    for stage, info in runs.items():
        assert info["mode"] == "offline" and info["url"] is None
        assert os.path.isdir(info["dir"]) and info["dir"].endswith(info["run_id"]), stage

    html = dashboard.build_page(recipe, "http://head:8265")
    assert REFRESH in html and _states(html) == {r: rows[r]["state"] for r in rows}
    assert _grid_src(html) == (out / "dvae" / "reconstructions.png").read_bytes()
    assert "<a href='http://head:8265'>" in html
    assert f"offline run {runs['clip']['run_id']}: <code>wandb sync {runs['clip']['dir']}</code>" in html
    assert "60/60 steps" in [row[2] for row in _page(html).tables["stages"][1:]]

    # the same page from an object store: everything is read through pipeline.storage
    memory = f"memory://{tmp_path.name}/out"
    fsspec.filesystem("memory").put(str(out), f"/{tmp_path.name}/out", recursive=True)
    data = yaml.safe_load(recipe_path.read_text())
    data["output_dir"] = memory
    (tmp_path / "memory.yaml").write_text(yaml.safe_dump(data))
    try:
        remote = dashboard.build_page(load_recipe(tmp_path / "memory.yaml"), "http://head:8265")
    finally:
        fsspec.filesystem("memory").rm(f"/{tmp_path.name}", recursive=True)
    unbuilt = lambda page: re.sub(r"built [-0-9 :]+", "", page)
    assert memory in remote and unbuilt(remote.replace(memory, str(out))) == unbuilt(html)

    # a failed shard is listed (escaped); once every stage is done the page stops refreshing
    storage.write_json(str(out / "train" / "_fingerprint.json"), {"stage": "train"})  # it started, then
    Ledger(str(out / "train")).record_failure("00000", "ValueError: bad <shard> & co\nsecond line")
    html = dashboard.build_page(recipe, None)
    assert _states(html)["train"] == "failed" and REFRESH in html
    assert _page(html).tables["failures"][1:] == [["train", "00000", "ValueError: bad <shard> & co"]]
    assert "bad &lt;shard&gt; &amp; co" in html and "second line" not in html
    storage.write_json(str(out / "train" / "_done.json"), {"samples_in": 1, "samples_out": 1, "seconds": 2.0})
    html = dashboard.build_page(recipe, None)
    assert set(_states(html).values()) == {"complete"} and "http-equiv" not in html
    assert dashboard.status_json(recipe)["refresh_s"] is None

    # the curves are redrawn only when a metrics file grows
    calls = []
    monkeypatch.setattr(dashboard, "loss_curves", lambda runs: calls.append(1) or b"png")
    monkeypatch.setattr(dashboard, "_curves_cache", {"key": None, "png": None})
    dashboard.build_page(recipe, None)
    dashboard.build_page(recipe, None)
    assert len(calls) == 1
    with open(out / "dvae" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 61, "loss": 0.1}) + "\n")
    assert _grid_src(dashboard.build_page(recipe, None)) is not None and len(calls) == 2


def _screenshot(url, png):
    return screenshot(url, png, height=1600)


def _pixels(shot, colour) -> int:
    return int(np.all(shot == colour, axis=-1).sum())


def _start(args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=ENV, start_new_session=True, **kwargs
    )


@contextlib.contextmanager
def _paused(proc):
    """SIGSTOPs every process of the run's session (as a suspended machine would be), so that the
    page is taken mid-training however slowly Chromium starts; SIGCONTs them after."""
    stopped: set[int] = set()
    try:
        while new := set(session_pids(proc.pid)) - stopped:  # until no stopped process had forked
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= new
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _wait(ready, proc, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} never came")
        time.sleep(0.05)


@pytest.mark.slow
def test_dashboard_in_headless_chromium_during_and_after_a_run(run, tmp_path):
    recipe, out = recipe_at(tmp_path, run, UPSTREAM)
    data = yaml.safe_load(recipe.read_text())
    data["sample"] = {"prompts": ["a large red circle on the left"], "candidates": 4, "top": 4}
    data["transformer"]["train"].update(steps=20, checkpoint_every=10)
    recipe.write_text(yaml.safe_dump(data))
    with open(tmp_path / "dashboard.err", "w") as err:
        dash = _start(["dashboard", str(recipe), "--port", "0"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert select.select([dash.stdout], [], [], 120)[0], "the dashboard printed no address"
        line = dash.stdout.readline()
        assert re.fullmatch(r"dashboard: http://127\.0\.0\.1:\d+/\n", line), line
        url = line.split()[1]
        with open(tmp_path / "run.log", "w") as log:
            job = _start(["run", str(recipe), "--no-progress"], stdout=log, stderr=log)
        try:
            progress, done = out / "train" / "_train" / "progress.json", out / "train" / "_done.json"
            _wait(lambda: train_step(progress) >= 2 and not done.exists(), job, "training")
            with _paused(job):
                assert not done.exists()
                facts = json.loads(_get(url + "api/status")[1])
                during = _screenshot(url, tmp_path / "during.png")
                html = _get(url)[1].decode()
            train = {r["stage"]: r for r in facts["stages"]}["train"]
            assert train["state"] == "partial" and 2 <= train["training"]["step"] <= 20 == train["training"]["steps"]
            assert _states(html)["train"] == "partial" and REFRESH in html
            assert facts["latest_grid"]["stage"] == "dvae"
            _wait(lambda: job.poll() is not None, job, "the run's end")
        except BaseException:
            kill_session(job)
            raise
        assert job.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
        kill_session(job)

        after = _screenshot(url, tmp_path / "after.png")
        html = _get(url)[1].decode()
        facts = json.loads(_get(url + "api/status")[1])
        assert facts["complete"] and set(_states(html).values()) == {"complete"} and "http-equiv" not in html
        assert facts["latest_grid"]["stage"] == "sample" and "a large red circle on the left" in html
        assert _grid_src(html) == (out / "sample" / "00000.png").read_bytes()

        # the pixels: during the run the train row is partial and the grid is the dVAE's; after it,
        # every row is complete and the grid is the sample stage's (each absent from the other shot)
        recon = np.asarray(Image.open(out / "dvae" / "reconstructions.png").convert("RGB"))
        grid = np.asarray(Image.open(out / "sample" / "00000.png").convert("RGB"))
        assert _pixels(during, PARTIAL) > 300 and _pixels(after, PARTIAL) == 0
        assert _pixels(after, COMPLETE) > 8 * 300
        # (`_shown` probes an image's middle row, here the white padding between originals and
        # reconstructions, so each half is looked for on its own)
        halves = recon[: recon.shape[0] // 2 + 1], recon[recon.shape[0] // 2 - 1 :]
        assert all(_shown(during, half) for half in halves) and not _shown(during, grid)
        assert _shown(after, grid) and not any(_shown(after, half) for half in halves)

        dash.send_signal(signal.SIGTERM)  # as Ctrl-C: a quiet exit
        assert dash.wait(timeout=30) == 0
        assert (tmp_path / "dashboard.err").read_text() == ""
    finally:
        kill_session(dash)
