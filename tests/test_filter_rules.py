"""Tests of the paper's filter rules (pure functions; fast)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.config.data import FilterSection
from pipeline.stages.filter_rules import (
    REASONS,
    LanguageID,
    caption_reason,
    hamming,
    image_reason,
    phash64,
)

CFG = FilterSection()
LANGID = LanguageID()


def test_reasons_order() -> None:
    assert REASONS == (
        "caption_empty", "caption_too_short", "caption_too_long", "non_english", "boilerplate",
        "aspect_ratio", "low_resolution", "duplicate_url", "duplicate_exact", "near_duplicate",
    )  # fmt: skip


# -- captions -----------------------------------------------------------------------------------


@pytest.mark.parametrize("caption", [None, "", "   ", "\n\t "])
def test_empty_caption(caption: str | None) -> None:
    assert caption_reason(caption, CFG, LANGID) == "caption_empty"


@pytest.mark.parametrize(
    "caption",
    ["photographed on 2019-04-03", "IMG_1234.JPG", "DSC_0042", "stock photo", "untitled", "Untitled ",
     "a red circle, taken on 3/4/2019", "my holiday picture.png", "a royalty free stock image of a cat"],
)  # fmt: skip
def test_default_boilerplate(caption: str) -> None:
    assert caption_reason(caption, CFG, LANGID) == "boilerplate"


def test_word_count_boundaries() -> None:
    cfg = FilterSection(min_caption_words=3, max_caption_words=6, languages=())
    assert caption_reason("red circle", cfg, LANGID) == "caption_too_short"
    assert caption_reason("a red circle", cfg, LANGID) is None
    assert caption_reason("a  red\tcircle\n", cfg, LANGID) is None
    assert caption_reason("a red circle on the left", cfg, LANGID) is None
    assert caption_reason("a red circle on the far left", cfg, LANGID) == "caption_too_long"


def test_boilerplate_checked_before_word_count() -> None:
    assert caption_reason("IMG_1234.JPG", FilterSection(min_caption_words=5), LANGID) == "boilerplate"


def test_custom_and_no_boilerplate_patterns() -> None:
    cfg = FilterSection(boilerplate_patterns=(r"(?s)lorem ipsum",), languages=())
    assert caption_reason("LOREM IPSUM dolor sit", cfg, LANGID) == "boilerplate"
    assert caption_reason("untitled red circle", cfg, LANGID) is None
    assert caption_reason("photographed on 2019-04-03", FilterSection(boilerplate_patterns=()), LANGID) is None


@pytest.mark.parametrize(
    "caption",
    ["a small red circle on the left", "a yellow star to the left of a purple diamond",
     "there is a large green triangle at the top", "A LARGE BLUE SQUARE ON THE RIGHT"],
)  # fmt: skip
def test_english_kept(caption: str) -> None:
    assert caption_reason(caption, CFG, LANGID) is None


@pytest.mark.parametrize(
    ("caption", "lang"),
    [("ein kleiner roter Kreis auf der linken Seite", "de"), ("un petit cercle rouge à gauche", "fr"),
     ("un pequeño círculo rojo a la izquierda", "es"), ("маленький красный круг слева", "ru"),
     ("左边 有 一个 红色的 小圆圈", "zh")],
)  # fmt: skip
def test_other_languages_dropped(caption: str, lang: str) -> None:
    assert LANGID.classify(caption)[0] == lang
    assert caption_reason(caption, CFG, LANGID) == "non_english"
    assert caption_reason(caption, FilterSection(languages=()), LANGID) is None
    assert caption_reason(caption, FilterSection(languages=("en", lang)), LANGID) is None


def test_unsegmented_chinese_is_one_word() -> None:
    assert caption_reason("左边有一个红色的小圆圈", CFG, LANGID) == "caption_too_short"
    assert caption_reason("左边有一个红色的小圆圈", FilterSection(min_caption_words=1), LANGID) == "non_english"


def test_language_confidence_threshold() -> None:
    # Too short to be sure of anything: no language reaches 0.5, so the caption is kept.
    lang, prob = LANGID.classify("el perro negro")
    assert lang != "en" and prob < 0.5
    assert caption_reason("el perro negro", CFG, LANGID) is None
    assert caption_reason("el perro negro", FilterSection(min_language_confidence=0.0), LANGID) == "non_english"


def test_languageid_pickles_small() -> None:
    assert len(pickle.dumps(LANGID)) < 200
    assert pickle.loads(pickle.dumps(LANGID)).classify("a small red circle on the left")[0] == "en"


# -- image sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "h", "reason"),
    [(256, 256, None), (128, 256, None), (256, 128, None), (490, 1000, "aspect_ratio"),
     (1000, 490, "aspect_ratio"), (2001, 1000, "aspect_ratio"), (64, 64, None), (63, 64, "low_resolution"),
     (64, 100, None), (None, 256, "low_resolution"), (256, None, "low_resolution"), (0, 0, "low_resolution"),
     (10, 1000, "aspect_ratio")],
)  # fmt: skip
def test_image_reason(w: int | None, h: int | None, reason: str | None) -> None:
    assert image_reason(w, h, CFG) == reason


# -- perceptual hash ----------------------------------------------------------------------------


def shapes(kind: str, offset: int = 0, size: int = 256) -> Image.Image:
    image = Image.new("RGB", (size, size), (235, 230, 220))
    draw = ImageDraw.Draw(image)
    if kind == "circle_left":
        draw.ellipse([20 + offset, 80, 120 + offset, 180], fill=(200, 30, 30))
    else:
        draw.rectangle([140 + offset, 60, 230 + offset, 150], fill=(30, 60, 200))
    return image


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (128, 128, 3), dtype=np.uint8))


def test_phash_stable_under_small_changes() -> None:
    for base in (shapes("circle_left"), shapes("square_right"), noise(0)):
        h = phash64(base)
        assert 0 <= h < 1 << 64
        assert hamming(h, phash64(base.copy())) == 0
        assert hamming(h, phash64(jpeg(base, 60))) <= 4
        shifted = Image.new("RGB", base.size)
        shifted.paste(base, (1, 0))
        assert hamming(h, phash64(shifted)) <= 4


def test_phash_known_values() -> None:
    # Pins the definition (bit order, median rule): a flat image sets only the DC bit (the MSB).
    assert phash64(Image.new("RGB", (50, 70), (10, 200, 30))) == 1 << 63
    assert phash64(Image.new("L", (8, 8), 0)) == 0
    left_bright = Image.new("L", (64, 64), 0)
    left_bright.paste(255, (0, 0, 32, 64))
    # DC and the first horizontal cosine (bits 0 and 1) are the two large positive coefficients.
    assert phash64(left_bright) >> 62 == 0b11


def test_phash_separates_unrelated_images() -> None:
    assert hamming(phash64(shapes("circle_left")), phash64(shapes("square_right"))) > 10
    hashes = [phash64(noise(seed)) for seed in range(6)]
    assert all(hamming(a, b) > 10 for i, a in enumerate(hashes) for b in hashes[i + 1 :])


def test_hamming() -> None:
    assert hamming(0, 0) == 0
    assert hamming(0, (1 << 64) - 1) == 64
    assert hamming(0b1011, 0b0110) == 3
