"""A live web page of a run, served while it trains: `dalle dashboard RECIPE [--host 127.0.0.1]
[--port 8266] [--address RAY_DASHBOARD_URL]` (port 0 picks a free one; Ctrl-C stops it).

Each request builds the page afresh from the stage folders alone, through `pipeline.storage`
(so an `s3://` output_dir works too): per stage its state, shards done/total as a bar (training
steps for dvae, clip and train), samples in/out and samples/s; the failed shards with their error;
the training curves; the newest sample grid (else evaluate's, else the dVAE's reconstructions);
links to the Ray dashboard and each W&B run. The page reloads itself every 5 s until every stage
is complete. `/api/status` returns the same facts as JSON.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from pipeline import storage, workflow
from pipeline.config.recipe import Recipe
from pipeline.errors import one_line
from pipeline.observe.tracking import read_metrics
from pipeline.stages.base import StageStatus, TrainingProgress
from pipeline.views.page import STYLE, e, figure
from pipeline.views.report import CURVES, loss_curves

REFRESH_S = 5
TRAINED = ("dvae", "clip", "train")
GRID_STAGES = ("sample", "evaluate")
STYLE = (
    STYLE
    + """
td.complete { background: #c6efce; } td.partial { background: #ffe699; }
td.failed { background: #ffc7ce; } td.pending { background: #ededed; } td.progress { text-align: left; }
.bar { display: inline-block; width: 120px; height: 10px; background: #ddd; margin-right: 6px; }
.bar > div { height: 10px; background: #4a7bd0; }
"""
)
_curves_lock = threading.Lock()
_curves_cache: dict[str, Any] = {"key": None, "png": None}


def _size(url: str) -> int | None:
    fs, path = storage.get_fs(url)
    try:
        return fs.size(path)
    except FileNotFoundError:
        return None


def _rate(samples: int, seconds: float | None) -> float | None:
    return round(samples / seconds, 2) if seconds else None


def _shard_rate(row: StageStatus, records: dict) -> float | None:
    """samples/s: over the finished stage's wall time, else over the span of its committed shard tasks."""
    if row.state == "complete":
        return _rate(row.samples_out, row.seconds)
    if not records:
        return None
    start = min(r.finished_at - r.seconds for r in records.values())
    end = max(r.finished_at for r in records.values())
    return _rate(sum(r.samples_out for r in records.values()), end - start)


def _training(row: StageStatus, metrics: list[dict]) -> TrainingProgress | None:
    """A trained stage's step and steps (its status), with the samples/s of its last metrics line."""
    rated = [m for m in metrics if "samples_per_s" in m]
    training = row.training
    if training is None and metrics:
        training = TrainingProgress(metrics[-1]["step"], None)
    if training is None or not rated:
        return training
    return replace(training, samples_per_s=rated[-1]["samples_per_s"])


def _latest_grid(url: dict[str, str], records: dict[str, dict]) -> dict | None:
    """The newest committed grid of sample (else evaluate), else the dVAE's reconstructions."""
    for stage in GRID_STAGES:
        if records.get(stage):
            shard = max(records[stage].values(), key=lambda r: (r.finished_at, r.shard)).shard
            info = storage.read_json(storage.join(url[stage], f"{shard}.json"))
            prompt = info["prompt"]["text"] if isinstance(info["prompt"], dict) else info["prompt"]
            n = info["candidates"] if isinstance(info["candidates"], int) else len(info["candidates"])
            caption = f"{stage} stage, shard {shard}: the best {len(info['kept'])} of {n} by CLIP"
            png = storage.join(url[stage], f"{shard}.png")
            return {"stage": stage, "shard": shard, "prompt": prompt, "url": png, "caption": caption}
    recon = storage.join(url["dvae"], "reconstructions.png") if "dvae" in url else None
    if recon and storage.exists(recon):
        caption = "dVAE reconstructions (no samples yet): top held-out originals, bottom decoded from their tokens"
        return {"stage": "dvae", "shard": None, "prompt": None, "url": recon, "caption": caption}
    return None


def _collect(recipe: Recipe, ray_dashboard: str | None) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """The run's facts (JSON-ready) and each trained stage's metrics lines."""
    stages = {s.name: s for s in workflow.build_stages(recipe)}
    url = {name: s.url for name, s in stages.items()}
    records = {name: s.ledger.done() for name, s in stages.items()}
    runs = {name: read_metrics(storage.join(url[name], "metrics.jsonl")) for name in TRAINED if name in stages}
    rows, failures, tracking = [], [], []
    for status in workflow.status(recipe):
        name = status.stage
        training = _training(status, runs[name]) if name in runs else None
        rate = training.samples_per_s if training else _shard_rate(status, records[name])
        rows.append({**replace(status, training=training).to_dict(), "samples_per_s": rate})
        for shard, failure in sorted(stages[name].ledger.failures().items()):
            failures.append({"stage": name, "shard": shard, "error": failure["error"].partition("\n")[0]})
        info = storage.read_json_or_none(storage.join(url[name], "tracking.json"))
        if info is not None:
            tracking.append({"stage": name, **info})
    complete = all(r["state"] == "complete" for r in rows)
    facts = {
        "name": recipe.name,
        "output_dir": storage.absolute(recipe.output_dir),
        "complete": complete,
        "refresh_s": None if complete else REFRESH_S,
        "ray_dashboard": ray_dashboard,
        "stages": rows,
        "failures": failures,
        "wandb": tracking,
        "latest_grid": _latest_grid(url, records),
        "metrics_sizes": {name: _size(storage.join(url[name], "metrics.jsonl")) for name in runs},
    }
    return facts, runs


def status_json(recipe: Recipe, ray_dashboard: str | None = None) -> dict[str, Any]:
    """What the page shows, as JSON: the stage rows (`workflow.status` plus training progress and
    samples/s), failed shards, W&B runs, the latest grid and whether the run is complete."""
    return _collect(recipe, ray_dashboard)[0]


def _curves_png(sizes: dict[str, int | None], runs: dict[str, list[dict]], out_dir: str) -> bytes | None:
    """`report.loss_curves`, redrawn only when a metrics file changed size."""
    key = (out_dir, tuple(sorted(sizes.items())))
    with _curves_lock:
        if _curves_cache["key"] != key:
            _curves_cache["png"] = loss_curves(runs)
            _curves_cache["key"] = key
        return _curves_cache["png"]


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _link(url: str | None, text: str) -> str:
    if url and url.startswith(("http://", "https://")):
        return f"<a href='{e(url)}'>{e(text)}</a>"
    return e(text)


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S") if ts else "-"


def _progress_cell(row: dict) -> str:
    training = row["training"]
    if training and training["steps"]:
        done, total, unit = training["step"], training["steps"], "steps"
    else:
        done, total, unit = row["shards_done"], row["shards_total"], "shards"
    if row["state"] == "complete" and not total:
        done = total = max(done, 1)
    fraction = min(1.0, done / total) if total else 0.0
    text = f"{done}/{'?' if total is None else total} {unit}"
    return f"<div class='bar'><div style='width:{100 * fraction:.0f}%'></div></div>{e(text)}"


def _stage_table(rows: list[dict]) -> str:
    head = "<tr><th>stage</th><th>state</th><th>progress</th><th>samples in</th><th>samples out</th>"
    head += "<th>samples/s</th><th>last update</th></tr>"
    body = []
    for r in rows:
        rate = "-" if r["samples_per_s"] is None else f"{r['samples_per_s']:,.1f}"
        cells = [f"<td>{e(r['stage'])}</td>", f"<td class='{e(r['state'])}'>{e(r['state'])}</td>"]
        cells.append(f"<td class='progress'>{_progress_cell(r)}</td>")
        cells += [f"<td>{e(c)}</td>" for c in (r["samples_in"], r["samples_out"], rate, _when(r["last_update"]))]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id='stages'>{head}{''.join(body)}</table>"


def _failures(failures: list[dict]) -> str:
    if not failures:
        return "<p class='missing'>no failed shards</p>"
    rows = "".join(
        "<tr>" + "".join(f"<td>{e(f[k])}</td>" for k in ("stage", "shard", "error")) + "</tr>" for f in failures
    )
    return f"<table id='failures'><tr><th>stage</th><th>shard</th><th>error</th></tr>{rows}</table>"


def _links(facts: dict[str, Any]) -> str:
    ray = facts["ray_dashboard"]
    items = [f"Ray dashboard: {_link(ray, ray)}" if ray else "no Ray dashboard given (--address)"]
    for run in facts["wandb"]:
        if run.get("url"):
            items.append(f"{e(run['stage'])}: W&amp;B run {_link(run['url'], run['name'])}")
        else:
            sync = f"<code>wandb sync {e(run['dir'])}</code>"
            items.append(f"{e(run['stage'])}: offline run {e(run['run_id'])}: {sync}")
    return "<ul id='links'>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def build_page(recipe: Recipe, ray_dashboard: str | None = None) -> str:
    """The dashboard's HTML, images embedded as data: URIs."""
    facts, runs = _collect(recipe, ray_dashboard)
    refresh = f"<meta http-equiv='refresh' content='{REFRESH_S}'>" if facts["refresh_s"] else ""
    state = f"reloads every {REFRESH_S} s while the run is going" if refresh else "every stage complete"
    built = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    body = [f"<h1>{e(facts['name'])}</h1><p>{e(facts['output_dir'])} &middot; built {built} &middot; {state}</p>"]
    body += [_links(facts), "<h2>Stages</h2>", _stage_table(facts["stages"]), "<h2>Failures</h2>"]
    body.append(_failures(facts["failures"]))
    body.append("<h2>Latest samples</h2>")
    grid = facts["latest_grid"]
    if grid is None:
        body.append("<p class='missing'>no samples yet</p>")
    else:
        prompt = f"<b>{e(grid['prompt'])}</b><br>" if grid["prompt"] else ""
        img = f"<img id='latest-grid' src='{_data_uri(storage.read_bytes(grid['url']))}' alt='{e(grid['caption'])}'>"
        body.append(f"<figure>{img}<figcaption>{prompt}{e(grid['caption'])}</figcaption></figure>")
    body.append("<h2>Training curves</h2>")
    curves = _curves_png(facts["metrics_sizes"], {s: runs[s] for s, _ in CURVES if s in runs}, facts["output_dir"])
    body.append(figure(_data_uri(curves), "", "loss curves", "plot") if curves else "")
    body.append("" if curves else "<p class='missing'>no training metrics yet</p>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>{e(facts['name'])} dashboard</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if path not in ("/", "/api/status"):
            self.send_error(404, "not found: try / or /api/status")
            return
        recipe, ray = self.server.recipe, self.server.ray_dashboard
        try:
            if path == "/":
                body, kind = build_page(recipe, ray).encode(), "text/html; charset=utf-8"
            else:
                body, kind = json.dumps(status_json(recipe, ray), indent=1).encode(), "application/json"
        except Exception as err:  # noqa: BLE001 - shown to the browser; the next refresh tries again
            self.send_error(500, one_line(err))
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request is noise
        pass


def make_server(recipe: Recipe, host: str, port: int, ray_dashboard: str | None = None) -> ThreadingHTTPServer:
    """The dashboard's HTTP server, bound (port 0: a free one) but not serving yet."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.recipe, server.ray_dashboard = recipe, ray_dashboard
    return server


def serve(recipe: Recipe, host: str = "127.0.0.1", port: int = 8266, ray_dashboard: str | None = None) -> None:
    """Prints `dashboard: http://HOST:PORT/` and serves until Ctrl-C (KeyboardInterrupt)."""
    server = make_server(recipe, host, port, ray_dashboard)
    print(f"dashboard: http://{host}:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
