"""report.html: one page that shows what a run made, built from the stage folders alone.

The stage table (time, shards, samples in/out, drops by reason), the training curves of the dVAE,
CLIP and the transformer (PNG, matplotlib), the dVAE's reconstructions next to their originals,
the sample stage's grids and the evaluate stage's accuracy table and grids for seen and held-out
prompts. Images are written beside it under `report/`, so the page works from any copy of the
output folder. `dalle run` writes it after the last stage; `dalle report RECIPE` at any time.
"""

from __future__ import annotations

import datetime
import html
import io
import os
from typing import Any

from pipeline import storage, workflow
from pipeline.config.recipe import Recipe
from pipeline.observe.tracking import read_metrics
from pipeline.stages.base import StageStatus
from pipeline.stages.generation import shard_records
from pipeline.synthetic.prompts import GROUPS

ASSETS = "report"
# (stage, metric keys drawn on its panel) of the training curves
CURVES = (
    ("dvae", ("loss",)),
    ("clip", ("loss",)),
    ("train", ("loss", "heldout_loss", "ema_heldout_loss")),
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; font-size: 14px; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { image-rendering: pixelated; display: block; zoom: 2; }
img.plot { zoom: 1; }
figure { display: inline-block; margin: 0 16px 16px 0; vertical-align: top; }
figcaption { font-size: 13px; max-width: 360px; }
.missing { color: #999; font-style: italic; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def loss_curves(runs: dict[str, list[dict]]) -> bytes | None:
    """A PNG with one panel per stage that logged metrics (`runs`: stage -> metrics.jsonl lines)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [(stage, keys) for stage, keys in CURVES if runs.get(stage)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(line["step"], line[key]) for line in runs[stage] if key in line]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 8 else None, markersize=3, label=key)
        ax.set_title(stage)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _image(out_dir: str, name: str, data: bytes) -> str:
    storage.write_atomic(storage.join(out_dir, ASSETS, name), data)
    return f"{ASSETS}/{name}"


def _stage_table(rows: list[StageStatus]) -> str:
    head = "<tr><th>stage</th><th>state</th><th>time (s)</th><th>shards</th><th>samples in</th>"
    head += "<th>samples out</th><th>drops by reason</th></tr>"
    body = []
    for r in rows:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "-"
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        shards = f"{r.shards_done}/{'?' if r.shards_total is None else r.shards_total}"
        cells = (r.stage, r.state, seconds, shards, r.samples_in, r.samples_out, drops)
        body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table id='stages'>{head}{''.join(body)}</table>"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def accuracy_table(groups: dict[str, Any]) -> str:
    """Whole-caption accuracy before/after reranking, per-attribute accuracy after, CLIP scores."""
    attrs = ("colour", "shape", "size", "position", "count", "relation")
    head = "<tr><th>prompts</th><th>n</th><th>all, before rerank</th><th>all, after rerank</th>"
    head += "".join(f"<th>{a} (after)</th>" for a in attrs) + "<th>CLIP all</th><th>CLIP kept</th></tr>"
    body = []
    order = [g for g in (*GROUPS, "overall") if g in groups] + sorted(set(groups) - {*GROUPS, "overall"})
    for name, m in ((g, groups[g]) for g in order):
        cells = [name, m["prompts"], _pct(m["before"]["all"]), _pct(m["after"]["all"])]
        cells += [_pct(m["after"].get(a)) for a in attrs]
        cells += [f"{m['clip_score']:.3f}", f"{m['clip_score_kept']:.3f}"]
        body.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<table id='accuracy'>{head}{''.join(body)}</table>"


def _figure(src: str, caption: str, alt: str, css: str = "") -> str:
    """An image with its caption; images show at twice their size, pixels kept sharp (class `plot`: 1x)."""
    cls = f" class='{css}'" if css else ""
    return f"<figure><img{cls} src='{_e(src)}' alt='{_e(alt)}'><figcaption>{caption}</figcaption></figure>"


def _sample_section(out_dir: str, url: str) -> str:
    parts = []
    for shard, info in shard_records(url):
        src = _image(out_dir, f"sample_{shard}.png", storage.read_bytes(storage.join(url, f"{shard}.png")))
        best = info["kept"][0]["score"]
        caption = (
            f"<b>{_e(info['prompt'])}</b><br>best {len(info['kept'])} of {info['candidates']}, top CLIP {best:.3f}"
        )
        if "image" in info:
            name = _e(os.path.basename(info["image"]))
            caption += f"<br>completing the top {info['rows']} token rows of {name}"
        parts.append(_figure(src, caption, f"samples: {info['prompt']}"))
    return "".join(parts)


def _evaluate_section(out_dir: str, url: str, per_group: int) -> str:
    metrics = storage.read_json_or_none(storage.join(url, "metrics.json"))
    if metrics is None:
        return "<p class='missing'>not evaluated yet</p>"
    parts = [
        f"<p>{metrics['candidates']} candidates per prompt, the best {metrics['top']} by CLIP kept; "
        "accuracy read from the pixels by the analyzer.</p>",
        accuracy_table(metrics["groups"]),
    ]
    shown: dict[str, int] = {}
    for shard, info in shard_records(url):
        group = info["prompt"]["group"]
        if shown.get(group, 0) >= per_group:
            continue
        if not shown.get(group):
            parts.append(f"<h3>{_e(group)}</h3>")
        shown[group] = shown.get(group, 0) + 1
        right = sum(info["candidates"][i]["checks"]["all"] for i in info["kept"])
        src = _image(out_dir, f"evaluate_{shard}.png", storage.read_bytes(storage.join(url, f"{shard}.png")))
        caption = f"<b>{_e(info['prompt']['text'])}</b><br>{right} of {len(info['kept'])} kept images right"
        parts.append(_figure(src, caption, f"{group}: {info['prompt']['text']}"))
    return "".join(parts)


def build_report(recipe: Recipe) -> str:
    """Writes the report's images under `<output_dir>/report/` and returns the page."""
    out_dir = storage.absolute(recipe.output_dir)
    rows = workflow.status(recipe)
    names = {r.stage for r in rows}
    stage_url = {name: storage.join(out_dir, name) for name in names}
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{_e(recipe.name)}</h1><p>{_e(out_dir)} &middot; report written {when}</p>"]
    body.append("<h2>Stages</h2>" + _stage_table(rows))

    runs = {
        stage: read_metrics(storage.join(stage_url[stage], "metrics.jsonl")) for stage, _ in CURVES if stage in names
    }
    curves = loss_curves(runs)
    body.append("<h2>Training curves</h2>")
    body.append(_figure(_image(out_dir, "loss_curves.png", curves), "", "loss curves", "plot") if curves else "")
    if not curves:
        body.append("<p class='missing'>no training metrics yet</p>")

    body.append("<h2>dVAE reconstructions</h2>")
    recon = storage.join(stage_url.get("dvae", ""), "reconstructions.png")
    if "dvae" in names and storage.exists(recon):
        src = _image(out_dir, "reconstructions.png", storage.read_bytes(recon))
        body.append(_figure(src, "top: held-out originals; bottom: decoded from their tokens", "dVAE reconstructions"))
    else:
        body.append("<p class='missing'>no reconstructions yet</p>")

    if "sample" in names:
        body.append("<h2 id='samples'>Samples</h2>" + (_sample_section(out_dir, stage_url["sample"]) or ""))
    if "evaluate" in names:
        per_group = recipe.evaluate.grid_prompts
        body.append(
            "<h2 id='evaluation'>Evaluation</h2>" + _evaluate_section(out_dir, stage_url["evaluate"], per_group)
        )
    page = "\n".join(body)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(recipe.name)} report</title>"
        f"<style>{_STYLE}</style></head><body>{page}</body></html>"
    )


def write_report(recipe: Recipe) -> str:
    """Writes `<output_dir>/report.html` (and its images); returns its URL."""
    page = build_report(recipe)
    url = storage.join(storage.absolute(recipe.output_dir), "report.html")
    storage.write_atomic(url, page.encode())
    return url
