"""report.html: one page that shows what a run made, built from the stage folders alone.

The stage table (time, shards, samples in/out, drops by reason), the training curves of the dVAE,
CLIP and the transformer (PNG, matplotlib), the dVAE's reconstructions next to their originals,
the sample stage's grids and the evaluate stage's section (`pipeline.views.evaluation`):
accuracy per prompt group, binding against the number of objects, colour and shape confusion,
the guidance sweep, and grids for seen and held-out prompts. Images are written beside it under
`report/`, so the page works from any copy of the output folder. `dalle run` writes it after the
last stage; `dalle report RECIPE` at any time.
"""

from __future__ import annotations

import datetime
import os

from pipeline import storage, workflow
from pipeline.config.recipe import Recipe
from pipeline.observe.tracking import read_metrics
from pipeline.stages.base import StageStatus
from pipeline.stages.generation import shard_records
from pipeline.views.evaluation import evaluate_section
from pipeline.views.page import STYLE, asset, e, figure, png, pyplot

# (stage, metric keys drawn on its panel) of the training curves
CURVES = (
    ("dvae", ("loss",)),
    ("clip", ("loss",)),
    ("train", ("loss", "heldout_loss", "ema_heldout_loss")),
)


def loss_curves(runs: dict[str, list[dict]]) -> bytes | None:
    """A PNG with one panel per stage that logged metrics (`runs`: stage -> metrics.jsonl lines)."""
    panels = [(stage, keys) for stage, keys in CURVES if runs.get(stage)]
    if not panels:
        return None  # (a data-only run: matplotlib is not even imported)
    plt = pyplot()
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
    return png(fig)


def _stage_table(rows: list[StageStatus]) -> str:
    head = "<tr><th>stage</th><th>state</th><th>time (s)</th><th>shards</th><th>samples in</th>"
    head += "<th>samples out</th><th>drops by reason</th></tr>"
    body = []
    for r in rows:
        drops = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v) or "-"
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        shards = f"{r.shards_done}/{'?' if r.shards_total is None else r.shards_total}"
        cells = (r.stage, r.state, seconds, shards, r.samples_in, r.samples_out, drops)
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    return f"<table id='stages'>{head}{''.join(body)}</table>"


def _sample_section(out_dir: str, url: str) -> str:
    parts = []
    for shard, info in shard_records(url):
        src = asset(out_dir, f"sample_{shard}.png", storage.read_bytes(storage.join(url, f"{shard}.png")))
        best = info["kept"][0]["score"]
        caption = f"<b>{e(info['prompt'])}</b><br>best {len(info['kept'])} of {info['candidates']}, top CLIP {best:.3f}"
        if "image" in info:
            name = e(os.path.basename(info["image"]))
            caption += f"<br>completing the top {info['rows']} token rows of {name}"
        parts.append(figure(src, caption, f"samples: {info['prompt']}"))
    return "".join(parts)


def build_report(recipe: Recipe) -> str:
    """Writes the report's images under `<output_dir>/report/` and returns the page."""
    out_dir = storage.absolute(recipe.output_dir)
    rows = workflow.status(recipe)
    names = {r.stage for r in rows}
    stage_url = {name: storage.join(out_dir, name) for name in names}
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{e(recipe.name)}</h1><p>{e(out_dir)} &middot; report written {when}</p>"]
    body.append("<h2>Stages</h2>" + _stage_table(rows))

    runs = {
        stage: read_metrics(storage.join(stage_url[stage], "metrics.jsonl")) for stage, _ in CURVES if stage in names
    }
    curves = loss_curves(runs)
    body.append("<h2>Training curves</h2>")
    body.append(figure(asset(out_dir, "loss_curves.png", curves), "", "loss curves", "plot") if curves else "")
    if not curves:
        body.append("<p class='missing'>no training metrics yet</p>")

    body.append("<h2>dVAE reconstructions</h2>")
    recon = storage.join(stage_url.get("dvae", ""), "reconstructions.png")
    if "dvae" in names and storage.exists(recon):
        src = asset(out_dir, "reconstructions.png", storage.read_bytes(recon))
        body.append(figure(src, "top: held-out originals; bottom: decoded from their tokens", "dVAE reconstructions"))
    else:
        body.append("<p class='missing'>no reconstructions yet</p>")

    if "sample" in names:
        body.append("<h2 id='samples'>Samples</h2>" + (_sample_section(out_dir, stage_url["sample"]) or ""))
    if "evaluate" in names:
        per_group = recipe.evaluate.grid_prompts
        body.append("<h2 id='evaluation'>Evaluation</h2>" + evaluate_section(out_dir, stage_url["evaluate"], per_group))
    page = "\n".join(body)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(recipe.name)} report</title>"
        f"<style>{STYLE}</style></head><body>{page}</body></html>"
    )


def write_report(recipe: Recipe) -> str:
    """Writes `<output_dir>/report.html` (and its images); returns its URL."""
    page = build_report(recipe)
    url = storage.join(storage.absolute(recipe.output_dir), "report.html")
    storage.write_atomic(url, page.encode())
    return url
