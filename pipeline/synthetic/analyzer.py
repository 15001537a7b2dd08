"""Reads the synthetic shapes back out of an image, to score generated images against their captions.

`analyze` segments the palette-coloured objects from the dark background of `pipeline.synthetic.dataset`
renders and recovers each one's colour, shape, size and position from the pixels alone; `relation`
describes one found object relative to another; `score` says, per attribute, whether what was found
matches a caption's ground truth. Deterministic and pure numpy, so the same image always scores the same.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from pipeline.synthetic.captions import COLOURS, LAYOUT, RELATIONS

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)
# Fraction of the way from the background to a palette colour above which a pixel is that colour's:
# a half-covered edge pixel counts, so the mask keeps the drawn area at 64 px too.
_ALPHA = 0.5
# Largest distance (RGB units) of a pixel from the background-to-colour line; JPEG and blur stay inside.
_OFF_LINE = 60.0
# Components smaller than this fraction of the image are specks (JPEG ringing, decoder noise).
_MIN_AREA = 0.002
# Shapes are measured on masks this many times finer than the image (see `_fine_mask`).
_UPSAMPLE = 4
# Area of each shape over its circumradius squared, from the renderer's outlines (`_CORNERS`).
_AREA_PER_R2 = {"circle": math.pi, "square": 2.0, "triangle": 1.299, "diamond": 1.24, "star": 1.322}
# Circumradius over the shorter side: small is at most 0.10 and large at least 0.18 (`_RADIUS`), so
# the geometric mean splits them with the same ratio of margin either way.
_SIZE_SPLIT = math.sqrt(0.10 * 0.18)
# A lone object's centre: within this of the middle (either axis) is "centre" (regions reach 0.08),
# beyond it the dominant axis names the side (side regions start 0.20 from the middle).
_CENTRE = 0.14


@dataclass(frozen=True)
class Found:
    """One object read from an image: attributes in the caption vocabulary, pixel box and area."""

    colour: str
    shape: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    pixels: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


def _labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: the nearest palette colour's index and whether it is foreground; and the background."""
    px = image.reshape(-1, 3).astype(np.float64)
    # Most of the canvas is background, so its per-channel median is the colour objects blend into.
    bg = np.median(px, axis=0)
    d = _PALETTE - bg  # (K, 3)
    # Model each pixel as bg + alpha * (colour - bg): alpha is how much of the colour it holds, the
    # residual how far it is off that blend line (blends of edges stay on it, other colours do not).
    alpha = np.clip(((px - bg) @ d.T) / (d * d).sum(1), 0.0, 1.0)  # (N, K)
    resid = np.linalg.norm(px[:, None, :] - (bg + alpha[..., None] * d), axis=2)
    best = resid.argmin(1)
    a = alpha[np.arange(len(px)), best]
    fg = (a >= _ALPHA) & (resid[np.arange(len(px)), best] <= _OFF_LINE)
    h, w = image.shape[:2]
    return best.reshape(h, w), fg.reshape(h, w), bg


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of `mask` by min-label propagation; -1 off the mask."""
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new = np.where(mask, new, big)
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (monotone chain) of integer points, counter-clockwise."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=np.float64)

    def half(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and (
                (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]) <= 0
            ):
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def _features(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Elongation, solidity and fill (area over circumscribed circle) of a binary mask."""
    ys, xs = np.nonzero(mask)
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    n = len(xs)
    cx, cy = xs.mean(), ys.mean()
    # Pixel centres sit half a pixel inside the drawn outline.
    radius = float(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max()) + 0.5
    # Diamonds are the only elongated shape (half-diagonals 1 : 0.62); the rest have isotropic moments.
    evals = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])) + 1e-9 * np.eye(2))
    elongation = math.sqrt(evals[1] / max(evals[0], 1e-9))
    # Solidity by Pick's theorem: a convex lattice region holds hull area + perimeter / 2 + 1 pixels,
    # so only the star's notches (ideal 0.56) take it well below 1.
    # Each row's end pixels span the same hull as all of them, at a fraction of the points.
    rows = np.nonzero(mask.any(1))[0]
    first, last = mask[rows].argmax(1), mask.shape[1] - 1 - mask[rows, ::-1].argmax(1)
    hull = _hull(np.concatenate([np.stack([first, rows], 1), np.stack([last, rows], 1)]))
    area = perimeter = 0.0
    if len(hull) >= 3:
        nxt = np.roll(hull, -1, axis=0)
        area = 0.5 * abs(float((hull[:, 0] * nxt[:, 1] - nxt[:, 0] * hull[:, 1]).sum()))
        perimeter = float(np.linalg.norm(nxt - hull, axis=1).sum())
    solidity = n / (area + perimeter / 2 + 1)
    # Inradius over circumradius of the hull, about the centroid: triangle 0.5, square 0.71, circle 1.
    inner = 0.0
    if len(hull) >= 3:
        edge = nxt - hull
        cross = np.abs(edge[:, 0] * (cy - hull[:, 1]) - edge[:, 1] * (cx - hull[:, 0]))
        inner = float((cross / np.maximum(np.linalg.norm(edge, axis=1), 1e-9)).min()) + 0.5
    roundness = inner / radius
    # Area over the circumscribed circle: circle 1.0, square 0.64, triangle 0.41.
    fill = n / (math.pi * radius**2)
    return elongation, solidity, fill, roundness


def _shape(elongation: float, solidity: float, fill: float, roundness: float) -> str:
    # Ideal values (elongation, solidity, fill, roundness): circle (1, 1, 1, 1), square (1, 1, .64, .71),
    # triangle (1, 1, .41, .5), diamond (1.6, 1, .39, .53), star (1, .56, .42, .81). At 64 px a small
    # star's notches fill in and corners round off, so the last two splits weigh several features;
    # the weights and cuts were fitted to renders at 96 and 64 px (BOX, bicubic, Lanczos; JPEG 95).
    if elongation > 1.3:
        return "diamond"
    if fill > 0.8:
        return "circle"
    if solidity + 0.2 * fill - 0.9 * roundness < 0.337:
        return "star"
    return "triangle" if solidity - 0.7 * fill + 1.7 * roundness < 1.613 else "square"


def _lone_position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < _CENTRE:
        return "centre"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _pair_positions(a: Found, b: Found, w: int, h: int) -> tuple[str, str]:
    """Each object's half for a pair: the axis whose midline parts them, else the one they differ most on."""

    def parted(lo: Found, hi: Found, axis: int, mid: float) -> bool:
        # A pixel of slack: blur and JPEG can push an edge just over the midline.
        return lo.box[axis + 2] <= mid + 1 and hi.box[axis] >= mid - 1

    (ax, ay), (bx, by) = a.centre, b.centre
    split_x = parted(a, b, 0, w / 2) or parted(b, a, 0, w / 2)
    split_y = parted(a, b, 1, h / 2) or parted(b, a, 1, h / 2)
    horizontal = split_x if split_x != split_y else abs(ax - bx) / w >= abs(ay - by) / h
    if horizontal:
        return ("left", "right") if ax < bx else ("right", "left")
    return ("top", "bottom") if ay < by else ("bottom", "top")


def _fine_mask(image: np.ndarray, member: np.ndarray, k: int, bg: np.ndarray) -> np.ndarray:
    """The component's mask at `_UPSAMPLE` times the resolution, from its colour's interpolated alpha.

    At 64 px a small star is ~11 px across; thresholding a smoothly upsampled alpha puts the outline
    between pixels, which keeps the notches and corners the shape features measure.
    """
    h, w = member.shape
    ys, xs = np.nonzero(member)
    y0, y1, x0, x1 = max(ys.min() - 2, 0), min(ys.max() + 3, h), max(xs.min() - 2, 0), min(xs.max() + 3, w)
    d = _PALETTE[k] - bg
    alpha = ((image[y0:y1, x0:x1].astype(np.float64) - bg) @ d) / (d @ d)
    # Only this component's pixels and their rim: a neighbouring object must not leak into the crop.
    near = member[y0:y1, x0:x1].copy()
    for _ in range(2):
        near[1:] |= near[:-1].copy()
        near[:-1] |= near[1:].copy()
        near[:, 1:] |= near[:, :-1].copy()
        near[:, :-1] |= near[:, 1:].copy()
    alpha = np.where(near, alpha, 0.0).astype(np.float32)
    big = Image.fromarray(alpha, mode="F").resize(
        ((x1 - x0) * _UPSAMPLE, (y1 - y0) * _UPSAMPLE), Image.Resampling.BILINEAR
    )
    return np.asarray(big) >= _ALPHA


def analyze(image: np.ndarray, max_objects: int = 2) -> list[Found]:
    """The objects in `image` (uint8 HxWx3), largest first (ties: leftmost), at most `max_objects`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = image[..., :3]
    h, w = image.shape[:2]
    colour_idx, fg, bg = _labels(image)
    comp = _components(fg)
    ids, counts = np.unique(comp[comp >= 0], return_counts=True)
    found = []
    for cid, n in zip(ids, counts):
        if n < _MIN_AREA * h * w:
            continue
        ys, xs = np.nonzero(comp == cid)
        # Majority colour: edge pixels blend with the background and may lean to a neighbouring hue.
        colour = _NAMES[int(np.bincount(colour_idx[ys, xs], minlength=len(_NAMES)).argmax())]
        shape = _shape(*_features(_fine_mask(image, comp == cid, _NAMES.index(colour), bg)))
        # Radius from the area with the shape's own constant: steadier than the outermost pixel.
        r = math.sqrt(n / _AREA_PER_R2[shape])
        size = "small" if r / min(h, w) < _SIZE_SPLIT else "large"
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        position = _lone_position((box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h)
        found.append(Found(colour, shape, size, position, box, int(n)))
    found.sort(key=lambda f: (-f.pixels, f.box[0], f.box[1]))
    found = found[:max_objects]
    if len(found) == 2:
        pa, pb = _pair_positions(found[0], found[1], w, h)
        found = [replace(f, position=p) for f, p in zip(found, (pa, pb))]
    return found


def relation(a: Found, b: Found) -> str:
    """Where `a` is relative to `b` (one of RELATIONS), along the axis their centres differ most on."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return RELATIONS[0] if ax < bx else RELATIONS[1]
    return RELATIONS[2] if ay < by else RELATIONS[3]


def _holds(a: Found, b: Found, rel: str) -> bool:
    # A relation holds when the boxes are apart along its axis (a pixel of blur allowed), whatever the
    # other axis does: a caption's "left of" stays true if one object also sits higher.
    left, right, above, below = RELATIONS
    x0a, y0a, x1a, y1a = a.box
    x0b, y0b, x1b, y1b = b.box
    return {left: x1a <= x0b + 1, right: x1b <= x0a + 1, above: y1a <= y0b + 1, below: y1b <= y0a + 1}[rel]


# A pair's expected positions as the relation of the first object to the second.
_PAIR = {positions: rel for rel, positions in LAYOUT.items()}


def score(found: Sequence[Found], objects: Sequence[Mapping[str, str]], relation: str | None = None) -> dict[str, bool]:
    """Per-attribute correctness of `found` against a caption's `objects` (and pair `relation`).

    Keys: colour, shape, size, position (every expected object matched and right), count, relation
    (pairs only) and all. Found objects are matched to expected ones by the assignment that gets the
    most attributes right, so the order either side does not matter.
    """
    attrs = ("colour", "shape", "size", "position")
    best: tuple[int, dict[str, bool]] | None = None
    k = min(len(found), len(objects))
    for perm in itertools.permutations(range(len(found)), k):
        pairs = [(found[i], objects[j]) for j, i in enumerate(perm)]
        right = [[getattr(f, a) == o[a] for a in attrs] for f, o in pairs]
        implied = _PAIR.get(tuple(o["position"] for o in objects))
        if len(pairs) == 2 and implied is not None:
            # A pair's positions are halves: an object in the left half may also lie wholly in the top
            # one, so check the halves' relation rather than the single name `analyze` picked.
            right[0][3] = right[1][3] = _holds(pairs[0][0], pairs[1][0], implied)
        ok = {a: len(pairs) == len(objects) and all(r[i] for r in right) for i, a in enumerate(attrs)}
        hits = sum(map(sum, right))
        if relation is not None:
            ok["relation"] = len(pairs) == 2 and _holds(pairs[0][0], pairs[1][0], relation)
            hits += ok["relation"]
        if best is None or hits > best[0]:
            best = (hits, ok)
    result = best[1] if best else {a: False for a in attrs} | ({"relation": False} if relation is not None else {})
    result["count"] = len(found) == len(objects)
    result["all"] = all(result.values())
    return result
