"""The report's evaluation section, from the evaluate stage's `metrics.json` and shard records:
accuracy per prompt group, binding against the number of objects, the colour and shape confusion
of the kept one-object images, accuracy against the guidance scale, and grids per group."""

from __future__ import annotations

from typing import Any

from pipeline import storage
from pipeline.stages.evaluate import UNREAD
from pipeline.stages.generation import shard_records
from pipeline.synthetic.captions import COLOURS, SHAPES
from pipeline.synthetic.prompts import GROUPS
from pipeline.views.page import asset, e, figure, pct, png, pyplot


def _row(cells) -> str:
    return "<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"


def accuracy_table(groups: dict[str, Any]) -> str:
    """Whole-caption accuracy before/after reranking, per-attribute accuracy after, CLIP scores."""
    attrs = ("colour", "shape", "size", "position", "count", "relation")
    head = "<tr><th>prompts</th><th>n</th><th>all, before rerank</th><th>all, after rerank</th>"
    head += "".join(f"<th>{a} (after)</th>" for a in attrs) + "<th>CLIP all</th><th>CLIP kept</th></tr>"
    body = []
    order = [g for g in (*GROUPS, "overall") if g in groups] + sorted(set(groups) - {*GROUPS, "overall"})
    for name, m in ((g, groups[g]) for g in order):
        cells = [name, m["prompts"], pct(m["before"]["all"]), pct(m["after"]["all"])]
        cells += [pct(m["after"].get(a)) for a in attrs]
        cells += [f"{m['clip_score']:.3f}", f"{m['clip_score_kept']:.3f}"]
        body.append(_row(cells))
    return f"<table id='accuracy'>{head}{''.join(body)}</table>"


def objects_table(objects: dict[str, Any]) -> str:
    """Binding (every object's colour and shape right) and whole-caption accuracy per object count."""
    head = "<tr><th>objects</th><th>prompts</th><th>binding, before</th><th>binding, after</th>"
    head += "<th>all, before</th><th>all, after</th></tr>"
    body = [
        _row(
            [
                n,
                m["prompts"],
                pct(m["before_binding"]),
                pct(m["after_binding"]),
                pct(m["before_all"]),
                pct(m["after_all"]),
            ]
        )
        for n, m in sorted(objects.items(), key=lambda kv: int(kv[0]))
    ]
    return f"<table id='objects'>{head}{''.join(body)}</table>"


def _curve(points: dict[str, list[tuple[float, float | None]]], xlabel: str, title: str) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for label, xy in points.items():
        xs = [x for x, y in xy if y is not None]
        ax.plot(xs, [100 * y for _, y in xy if y is not None], marker="o", markersize=4, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png(fig)


def confusion_table(attr: str, table: dict[str, dict[str, int]]) -> str:
    """Prompted (rows) against read (columns) for one attribute; each cell shaded by its row share."""
    names = COLOURS if attr == "colour" else SHAPES
    rows = [r for r in names if r in table]
    columns = [c for c in names if any(c in table[r] for r in rows)] + [UNREAD] * any(UNREAD in table[r] for r in rows)
    head = f"<tr><th>{e(attr)}: prompted \\ read</th>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"
    body = []
    for r in rows:
        total = sum(table[r].values())
        cells = [f"<td>{e(r)}</td>"]
        for c in columns:
            n = table[r].get(c, 0)
            hue = "120, 60%" if c == r else "0, 70%"
            shade = f" style='background: hsla({hue}, 50%, {n / total:.2f})'" if n else ""
            cells.append(f"<td{shade}>{n}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table id='confusion-{e(attr)}'>{head}{''.join(body)}</table>"


def guidance_table(sweep: list[dict[str, Any]]) -> str:
    head = "<tr><th>guidance</th><th>prompts</th><th>all, before rerank</th><th>all, after rerank</th></tr>"
    body = [_row([f"{p['guidance']:g}", p["prompts"], pct(p["before_all"]), pct(p["after_all"])]) for p in sweep]
    return f"<table id='guidance'>{head}{''.join(body)}</table>"


def evaluate_section(out_dir: str, url: str, per_group: int) -> str:
    """The whole evaluation section of the report (or a note that nothing was evaluated yet)."""
    metrics = storage.read_json_or_none(storage.join(url, "metrics.json"))
    if metrics is None:
        return "<p class='missing'>not evaluated yet</p>"
    scale = metrics.get("guidance", 1.0)
    parts = [
        f"<p>{metrics['candidates']} candidates per prompt (guidance {scale:g}), the best {metrics['top']} by CLIP "
        "kept; accuracy read from the pixels by the analyzer.</p>",
        accuracy_table(metrics["groups"]),
    ]
    objects = metrics.get("objects")
    if objects:
        parts.append("<h3>More objects</h3><p>Binding: every object drawn in its own colour and shape.</p>")
        parts.append(objects_table(objects))
        xy = {
            f"{k}, {when}": [(int(n), m[f"{when}_{k}"]) for n, m in sorted(objects.items(), key=lambda kv: int(kv[0]))]
            for k in ("binding", "all")
            for when in ("after", "before")
        }
        src = asset(out_dir, "objects.png", _curve(xy, "objects in the prompt", "accuracy against objects"))
        parts.append(figure(src, "", "accuracy against the number of objects", "plot"))
    confusion = metrics.get("confusion")
    if confusion and any(confusion.values()):
        parts.append("<h3>What one-object prompts get (kept images)</h3>")
        parts += [confusion_table(attr, table) for attr, table in confusion.items() if table]
    sweep = metrics.get("guidance_sweep")
    if sweep:
        parts.append("<h3>Guidance</h3><p>One-object prompts drawn again at each classifier-free guidance scale.</p>")
        parts.append(guidance_table(sweep))
        xy = {when: [(p["guidance"], p[f"{when}_all"]) for p in sweep] for when in ("after", "before")}
        src = asset(out_dir, "guidance.png", _curve(xy, "guidance scale", "whole caption against guidance"))
        parts.append(figure(src, "", "accuracy against the guidance scale", "plot"))
    shown: dict[str, int] = {}
    for shard, info in shard_records(url):
        group = info["prompt"]["group"]
        if info.get("sweep") or shown.get(group, 0) >= per_group:
            continue
        if not shown.get(group):
            parts.append(f"<h3>{e(group)}</h3>")
        shown[group] = shown.get(group, 0) + 1
        right = sum(info["candidates"][i]["checks"]["all"] for i in info["kept"])
        src = asset(out_dir, f"evaluate_{shard}.png", storage.read_bytes(storage.join(url, f"{shard}.png")))
        caption = f"<b>{e(info['prompt']['text'])}</b><br>{right} of {len(info['kept'])} kept images right"
        parts.append(figure(src, caption, f"{group}: {info['prompt']['text']}"))
    return "".join(parts)
