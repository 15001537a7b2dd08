"""The building blocks of the HTML pages (report.html and the dashboard): the style sheet, escaping,
percentages, figures, plots as PNG, and the report's image folder."""

from __future__ import annotations

import html
import io
from typing import Any

from pipeline import storage

ASSETS = "report"
"""Folder beside report.html holding its images (so the page works from any copy of the folder)."""

STYLE = """
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


def e(value: Any) -> str:
    """`value` as HTML-escaped text."""
    return html.escape(str(value))


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def figure(src: str, caption: str, alt: str, css: str = "") -> str:
    """An image with its caption; images show at twice their size, pixels kept sharp (class `plot`: 1x)."""
    cls = f" class='{css}'" if css else ""
    return f"<figure><img{cls} src='{e(src)}' alt='{e(alt)}'><figcaption>{caption}</figcaption></figure>"


def asset(out_dir: str, name: str, data: bytes) -> str:
    """Writes an image of the report under `<out_dir>/report/`; returns its relative source."""
    storage.write_atomic(storage.join(out_dir, ASSETS, name), data)
    return f"{ASSETS}/{name}"


def png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    from matplotlib import pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt
