"""The embedded captioned-shapes dataset: what the pipeline trains on when no crawl is at hand.

Rendered images of one or two coloured shapes, captions from paraphrased templates (in
`pipeline.synthetic.captions`, which also holds the attribute vocabulary re-exported here), and the
defects a real web crawl has (dead hosts, HTTP errors, non-images, truncated files, odd sizes,
duplicates, foreign or boilerplate captions). Every row says in `expect` what a correct pipeline
does with it. Pure: `generate` returns rows and file bodies; `pipeline.synthetic.server` serves them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config.data import SyntheticConfig

# Re-exported: the attribute vocabulary and `caption` stay importable from this module.
from pipeline.synthetic.captions import (
    COLOURS,
    LAYOUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    _boilerplate_caption,
    _foreign_caption,
    caption,
)

logger = logging.getLogger(__name__)

# Defect kind -> what a correct pipeline does with the row; clean rows are kind "clean", "ok".
DEFECT_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "dead_host": "connection_error",
        "http_404": "http_4xx",
        "http_500": "http_5xx",
        "not_image": "unsupported_format",
        "truncated_jpeg": "truncated",
        "png": "ok",
        "webp": "ok",
        "extreme_aspect": "aspect_ratio",
        "tiny": "low_resolution",
        "duplicate_url": "duplicate_url",
        "same_image_new_url": "duplicate_exact",
        "near_duplicate": "near_duplicate",
        "non_english": "non_english",
        "boilerplate": "boilerplate",
        "empty_caption": "caption_empty",
    }
)
_FROM_CLEAN = ("duplicate_url", "same_image_new_url", "near_duplicate")

# Circumradius as a fraction of the shorter side: large is at least 1.8x small.
_RADIUS = {"small": (0.08, 0.10), "large": (0.18, 0.22)}
_CORNERS = {"square": (4, 0.25, 1.0), "triangle": (3, -0.5, 1.0), "diamond": (4, -0.5, 0.62), "star": (10, -0.5, 0.45)}
# (x_lo, x_hi, y_lo, y_hi) fractions: where a lone object's centre goes, and the half of the
# canvas each object of a pair lies wholly inside, so that the relation is visibly true.
_REGION = {
    "left": (0.15, 0.30, 0.38, 0.62),
    "right": (0.70, 0.85, 0.38, 0.62),
    "top": (0.38, 0.62, 0.15, 0.30),
    "bottom": (0.38, 0.62, 0.70, 0.85),
    "centre": (0.42, 0.58, 0.42, 0.58),
}
_HALF = {
    "left": (0.0, 0.5, 0.0, 1.0),
    "right": (0.5, 1.0, 0.0, 1.0),
    "top": (0.0, 1.0, 0.0, 0.5),
    "bottom": (0.0, 1.0, 0.5, 1.0),
}
_CONTENT_TYPE = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass(frozen=True)
class SyntheticSet:
    """Rows to put in a URL list, the bodies the server serves, and the held-out pairs."""

    rows: list[dict]
    files: dict[str, tuple[bytes, str]]
    heldout: tuple[tuple[str, str], ...]


def _span(rng: random.Random, lo: float, hi: float) -> float:
    return rng.uniform(lo, hi) if lo <= hi else (lo + hi) / 2


def _background(w: int, h: int, rng: random.Random) -> np.ndarray:
    # A dark grey plus a smooth random field (an 8x8 grid upsampled): the field moves the low DCT
    # frequencies, which keeps renders of the same attributes apart under a perceptual hash.
    # Channels stay below ~90, far from every colour in COLOURS.
    nrng = np.random.default_rng(rng.getrandbits(64))
    base = rng.uniform(20, 45) + nrng.uniform(-6, 6, 3)
    grid = Image.fromarray(nrng.uniform(-25, 25, (8, 8)).astype(np.float32))
    field = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC))
    noise = nrng.uniform(-3, 3, (h, w, 3))
    return np.clip(base + field[..., None] + noise, 0, 255).astype(np.uint8)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    # Corners on the unit circle from `start` (in half-turns), every other one at radius `inner`.
    corners, start, inner = _CORNERS[shape]
    radii = [r * (inner if k % 2 else 1.0) for k in range(corners)]
    angles = [angle + math.pi * (start + 2 * k / corners) for k in range(corners)]
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles, strict=True)]


def render(
    objects: Sequence[Mapping[str, str]], size: int | tuple[int, int], rng: random.Random
) -> tuple[Image.Image, list[list[int]]]:
    """Draws `objects` (dicts with colour, shape, size, position) on a random dark background.

    `size` is a side or (width, height). A lone object's position is a region around that spot;
    each of two objects lies wholly in the named half. Returns the RGB image and each object's
    [x0, y0, x1, y1] pixel box. Object pixels are exactly their COLOURS value (no tint).
    """
    w, h = (size, size) if isinstance(size, int) else size
    image = Image.fromarray(_background(w, h, rng))
    draw = ImageDraw.Draw(image)
    side, boxes = min(w, h), []
    for obj in objects:
        r = rng.uniform(*_RADIUS[obj["size"]]) * side
        keep = r + 0.02 * side
        pos = obj["position"]
        region, inside = (_HALF[pos], _HALF[pos]) if len(objects) > 1 else (_REGION[pos], (0, 1, 0, 1))
        cx = _span(rng, max(region[0] * w, inside[0] * w + keep), min(region[1] * w, inside[1] * w - keep))
        cy = _span(rng, max(region[2] * h, inside[2] * h + keep), min(region[3] * h, inside[3] * h - keep))
        if obj["shape"] == "circle":
            points = [(cx - r, cy - r), (cx + r, cy + r)]
            draw.ellipse(points, fill=COLOURS[obj["colour"]])
        else:
            # Small tilts only: a square turned by 45 degrees would read as a diamond.
            tilt = 36 if obj["shape"] == "star" else 15
            points = _outline(obj["shape"], cx, cy, r, math.radians(rng.uniform(-tilt, tilt)))
            draw.polygon(points, fill=COLOURS[obj["colour"]])
        corners = np.array(points)
        low, high = np.maximum(np.floor(corners.min(0)), 0), np.minimum(np.ceil(corners.max(0)), (w, h))
        boxes.append([int(v) for v in (*low, *high)])
    return image, boxes


def heldout_pairs(cfg: SyntheticConfig) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs `generate(cfg)` keeps out of the data."""
    return _choose_heldout(cfg.heldout_pairs, random.Random(f"{cfg.seed}/heldout"))


def _choose_heldout(n: int, rng: random.Random) -> tuple[tuple[str, str], ...]:
    colours, shapes = rng.sample(list(COLOURS), len(COLOURS)), rng.sample(SHAPES, len(SHAPES))
    # Shifted diagonals: distinct pairs, and for n <= 20 every colour and shape keeps 2+ partners.
    return tuple(sorted((colours[i % len(colours)], shapes[(i + i // len(colours)) % len(shapes)]) for i in range(n)))


def _encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma keeps the edges of small objects their palette colour; PNG and WebP ignore it.
    image.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=quality, subsampling=0)
    return buf.getvalue()


class _Builder:
    """Draws scenes from a shuffled deck of allowed pairs and registers rows and served files."""

    def __init__(self, cfg: SyntheticConfig, heldout: tuple[tuple[str, str], ...]):
        self.cfg, self.rng = cfg, random.Random(f"{cfg.seed}/samples")
        self.allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in heldout]
        self.deck: list[tuple[str, str]] = []
        self.rows: list[dict] = []
        self.files: dict[str, tuple[bytes, str]] = {}

    def scene(self, two: bool = False, size: str | None = None) -> tuple[list[dict], str | None]:
        rng = self.rng
        # Dealing from shuffled copies of the allowed pairs shows each of them about equally often.
        if not self.deck:
            self.deck = rng.sample(self.allowed, len(self.allowed))
        pairs, relation, positions = [self.deck.pop()], None, (rng.choice(POSITIONS),)
        if two:
            pairs.append(rng.choice([p for p in self.allowed if p != pairs[0]]))
            relation = rng.choice(RELATIONS)
            positions = LAYOUT[relation]
        return [
            {"colour": c, "shape": s, "size": size or rng.choice(SIZES), "position": p}
            for (c, s), p in zip(pairs, positions, strict=True)
        ], relation

    def draw(
        self, objects: list[dict], relation: str | None, canvas: int | tuple[int, int] | None = None
    ) -> tuple[Image.Image, str]:
        image, boxes = render(objects, canvas or self.cfg.image_size, self.rng)
        truth = {"objects": [{**o, "box": b} for o, b in zip(objects, boxes, strict=True)]}
        if relation is not None:
            truth["relation"] = relation
        return image, json.dumps(truth, sort_keys=True)

    def add(self, kind: str, text: str, truth: str, body: bytes | None = None, ext: str = "jpg") -> dict:
        path = f"/img/{len(self.rows):06d}.{ext}"
        if kind in ("http_404", "http_500"):
            path = f"/status/{kind[-3:]}{path}"
        if body is not None:
            # not_image keeps its .jpg path: a crawl's URL does not say what the server sends.
            self.files[path] = (body, "text/html; charset=utf-8" if kind == "not_image" else _CONTENT_TYPE[ext])
        row = {"path": path, "caption": text, "truth": truth, "kind": kind, "expect": DEFECT_KINDS.get(kind, "ok")}
        self.rows.append(row)
        return row


def _defect(b: _Builder, kind: str, clean: list[tuple[dict, Image.Image]]) -> tuple[dict, dict | None]:
    """Adds one defect row; returns it and the clean row it copies (which must come first)."""
    rng, side = b.rng, b.cfg.image_size
    if kind in _FROM_CLEAN:
        src, image = rng.choice(clean)
        if kind == "duplicate_url":
            b.rows.append({**src, "kind": kind, "expect": DEFECT_KINDS[kind]})
            return b.rows[-1], src
        if kind == "same_image_new_url":
            return b.add(kind, src["caption"], src["truth"], b.files[src["path"]][0]), src
        truth, text = json.loads(src["truth"]), src["caption"]
        while text == src["caption"]:
            text = caption(truth["objects"], truth.get("relation"), rng)
        # Brightness and JPEG quality only: against the blotchy background a 1 px shift already
        # moves the 64-bit DCT hash by more than 4 bits now and then.
        arr = np.clip(np.asarray(image, dtype=np.int16) + rng.choice([-5, -3, 3, 5]), 0, 255)
        body = _encode(Image.fromarray(arr.astype(np.uint8)), "jpg", rng.randint(70, 80))
        return b.add(kind, text, src["truth"], body), src
    objects, relation = b.scene(size="large" if kind == "tiny" else None)
    text = caption(objects, relation, rng)
    if kind == "not_image":
        page = f"<!doctype html><html><head><title>Moved</title></head><body><p>{text}</p></body></html>"
        return b.add(kind, text, "null", page.encode()), None
    if kind in ("dead_host", "http_404", "http_500", "truncated_jpeg"):
        body = None
        if kind == "truncated_jpeg":
            full = _encode(b.draw(objects, relation)[0], "jpg")
            # cut inside the image data, past the headers up to the start of scan (what a header
            # check reads), so it is the decoder that meets the cut
            sos = full.find(b"\xff\xda")
            header_end = sos + 2 + int.from_bytes(full[sos + 2 : sos + 4], "big") if sos >= 0 else 0
            body = full[: max(len(full) // 4, header_end + 16)]
        return b.add(kind, text, "null", body), None
    canvas: int | tuple[int, int] = side
    if kind == "extreme_aspect":
        short = max(64, 2 * side // 3)
        canvas = (short * 9 // 2, short) if rng.random() < 0.5 else (short, short * 9 // 2)
    elif kind == "tiny":
        canvas = 16
    image, truth = b.draw(objects, relation, canvas)
    if kind == "non_english":
        text = _foreign_caption(objects[0], rng)
    elif kind == "boilerplate":
        text = _boilerplate_caption(rng)
    elif kind == "empty_caption":
        text = ""
    ext = kind if kind in ("png", "webp") else "jpg"
    return b.add(kind, text, truth, _encode(image, ext), ext), None


def generate(cfg: SyntheticConfig) -> SyntheticSet:
    """The clean samples plus round(count * defect_fraction) defect rows, in a seeded order."""
    heldout = heldout_pairs(cfg)
    b = _Builder(cfg, heldout)
    n_two = round(cfg.count * cfg.two_object_fraction)
    clean = []
    for i in range(cfg.count):
        objects, relation = b.scene(two=i < n_two)
        image, truth = b.draw(objects, relation)
        text = caption(objects, relation, b.rng)
        clean.append((b.add("clean", text, truth, _encode(image, "jpg")), image))
    kinds, sources = list(DEFECT_KINDS), {}
    for i in range(round(cfg.count * cfg.defect_fraction)):
        row, src = _defect(b, kinds[i % len(kinds)], clean)
        if src is not None:
            sources[id(row)] = src
    rows = list(b.rows)
    random.Random(f"{cfg.seed}/order").shuffle(rows)
    # A copy must follow its original, else the original would be the row filtered as duplicate.
    at = {id(r): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: max(at[id(r)], at[id(sources[id(r)])] + 0.5) if id(r) in sources else at[id(r)])
    logger.info("synthetic set: %d clean rows, %d defect rows, held out %s", cfg.count, len(rows) - cfg.count, heldout)
    return SyntheticSet(rows=rows, files=b.files, heldout=heldout)


def url_list_rows(dataset: SyntheticSet, base_url: str, dead_url: str) -> list[dict]:
    """URL-list rows: `url` is the server's base URL plus the path (dead_host rows: `dead_url`)."""
    base, dead = base_url.rstrip("/"), dead_url.rstrip("/")
    keep = ("caption", "truth", "kind", "expect")
    return [
        {"url": (dead if r["kind"] == "dead_host" else base) + r["path"], **{k: r[k] for k in keep}}
        for r in dataset.rows
    ]
