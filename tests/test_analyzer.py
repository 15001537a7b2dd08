"""Tests of the image analyzer that reads rendered shapes back, as it will read generated images."""

from __future__ import annotations

import collections
import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import dataset as synthetic
from pipeline.synthetic.analyzer import Found, analyze, relation, score

_REPEATS = 2  # passes over the full colour x shape x size grid, each one- and two-object


def _scenes(rng: random.Random) -> list[tuple[list[dict], str | None]]:
    """Every attribute triple alone and as the first of a pair, laid out the way `generate` does."""
    grid = [
        (c, s, z) for _ in range(_REPEATS) for c in synthetic.COLOURS for s in synthetic.SHAPES for z in synthetic.SIZES
    ]
    scenes: list[tuple[list[dict], str | None]] = []
    for c, s, z in grid:
        scenes.append(([{"colour": c, "shape": s, "size": z, "position": rng.choice(synthetic.POSITIONS)}], None))
        other = rng.choice([(c2, s2) for c2 in synthetic.COLOURS for s2 in synthetic.SHAPES if (c2, s2) != (c, s)])
        rel = rng.choice(synthetic.RELATIONS)
        first, second = synthetic.LAYOUT[rel]
        pair = [
            {"colour": c, "shape": s, "size": z, "position": first},
            {"colour": other[0], "shape": other[1], "size": rng.choice(synthetic.SIZES), "position": second},
        ]
        scenes.append((pair, rel))
    return scenes


def _stored(image: Image.Image) -> np.ndarray:
    # The pipeline's path: 96 px render resized to 64 px, stored as JPEG quality 95.
    small = image.resize((64, 64), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=95)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def accuracy() -> dict[str, dict[str, float]]:
    rng = random.Random(1234)
    hits: dict[str, collections.Counter] = {"96": collections.Counter(), "64": collections.Counter()}
    totals: dict[str, collections.Counter] = {"96": collections.Counter(), "64": collections.Counter()}
    for objects, rel in _scenes(rng):
        image, _ = synthetic.render(objects, 96, rng)
        for key, pixels in (("96", np.asarray(image)), ("64", _stored(image))):
            for attr, ok in score(analyze(pixels), objects, rel).items():
                hits[key][attr] += ok
                totals[key][attr] += 1
    return {key: {a: hits[key][a] / totals[key][a] for a in totals[key]} for key in hits}


@pytest.mark.parametrize("resolution", ["96", "64"])
def test_reads_rendered_attributes(accuracy: dict[str, dict[str, float]], resolution: str) -> None:
    acc = accuracy[resolution]
    assert set(acc) == {"colour", "shape", "size", "position", "count", "relation", "all"}
    for attr in ("colour", "shape", "size", "position", "count", "relation"):
        assert acc[attr] >= 0.99, (resolution, acc)
    assert acc["all"] >= 0.98, (resolution, acc)


def _found(colour: str, shape: str, box: tuple[int, int, int, int], position: str, size: str = "small") -> Found:
    return Found(colour, shape, size, position, box, (box[2] - box[0]) * (box[3] - box[1]))


def test_relation_from_centres() -> None:
    a = _found("red", "circle", (5, 20, 15, 30), "left")
    b = _found("blue", "square", (40, 25, 50, 35), "right")
    assert relation(a, b) == "to the left of"
    assert relation(b, a) == "to the right of"
    top = _found("red", "circle", (20, 2, 30, 12), "top")
    bottom = _found("red", "circle", (25, 45, 35, 55), "bottom")
    assert relation(top, bottom) == "above"
    assert relation(bottom, top) == "below"


def test_score_hand_made_cases() -> None:
    a = _found("red", "circle", (5, 20, 15, 30), "left")
    b = _found("blue", "square", (40, 25, 50, 35), "right")
    objects = [
        {"colour": "red", "shape": "circle", "size": "small", "position": "left"},
        {"colour": "blue", "shape": "square", "size": "small", "position": "right"},
    ]
    right = score([a, b], objects, "to the left of")
    assert all(right.values()) and set(right) == {"colour", "shape", "size", "position", "count", "relation", "all"}
    # Found order does not matter: the best assignment is used.
    assert score([b, a], objects, "to the left of")["all"]
    # Objects swapped on the canvas: attributes match but the layout and relation do not.
    a_moved = _found("red", "circle", (40, 25, 50, 35), "right")
    b_moved = _found("blue", "square", (5, 20, 15, 30), "left")
    swapped = score([a_moved, b_moved], objects, "to the left of")
    assert swapped["colour"] and swapped["shape"] and not swapped["relation"] and not swapped["position"]
    assert not swapped["all"]
    # Wrong colour.
    wrong = score([_found("green", "circle", a.box, "left"), b], objects, "to the left of")
    assert not wrong["colour"] and wrong["shape"] and wrong["count"] and not wrong["all"]
    # Missing object.
    missing = score([a], objects, "to the left of")
    assert not missing["count"] and not missing["relation"] and not missing["all"]
    # Nothing found at all for a lone object.
    none = score([], objects[:1])
    assert not any(none.values()) and "relation" not in none
    # An extra object breaks the count only.
    extra = score([a, b], objects[:1])
    assert extra["colour"] and extra["shape"] and not extra["count"] and not extra["all"]


def test_deterministic() -> None:
    image, _ = synthetic.render(
        [
            {"colour": "cyan", "shape": "star", "size": "large", "position": "top"},
            {"colour": "white", "shape": "triangle", "size": "small", "position": "bottom"},
        ],
        96,
        random.Random(3),
    )
    pixels = _stored(image)
    first = analyze(pixels)
    assert len(first) == 2
    assert analyze(pixels.copy()) == first
    assert [f.pixels for f in first] == sorted((f.pixels for f in first), reverse=True)


def test_blank_background_has_no_objects() -> None:
    for seed in range(5):
        image, boxes = synthetic.render([], 96, random.Random(seed))
        assert boxes == []
        assert analyze(np.asarray(image)) == []
        assert analyze(_stored(image)) == []


def test_rejects_non_rgb() -> None:
    with pytest.raises(ValueError):
        analyze(np.zeros((8, 8), dtype=np.uint8))
