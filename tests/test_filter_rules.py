"""Tests of the paper's filter rules (pure functions; fast)."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.config.data import FilterSection
from pipeline.stages.filter_rules import (
    REASONS,
    LanguageID,
    SampleFacts,
    caption_reason,
    count_reasons,
    decide,
    hamming,
    image_reason,
    phash64,
)

CFG = FilterSection()
LANGID = LanguageID()


def facts(key: str, **kw) -> SampleFacts:
    base = dict(
        url=f"http://x/{key}.jpg",
        caption="a small red circle on the left",
        sha256=f"sha-{key}",
        phash=None,
        original_width=256,
        original_height=256,
    )
    base.update(kw)
    return SampleFacts(key=key, **base)


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


# -- decide -------------------------------------------------------------------------------------


def test_decide_per_sample_and_dedup_reasons() -> None:
    cfg = FilterSection(near_duplicate_distance=4)
    items = [
        facts("00", phash=0),
        facts("01", caption="untitled", phash=1 << 40),
        facts("02", original_width=300, original_height=100, phash=1 << 50),
        facts("03", url="http://x/00.jpg", phash=(1 << 64) - 1),
        facts("04", sha256="sha-00", caption=" A small  RED circle on the left ", phash=(1 << 63) - 1),
        facts("05", sha256="sha-00", caption="a different caption for it"),
        facts("06", phash=0b1111),
        facts("07", phash=0b11111),
        facts("08", caption=""),
        facts("09", caption="word " * 201),
        facts("10", caption="ein kleiner roter Kreis auf der linken Seite"),
        facts("11", original_width=None),
    ]
    assert decide(items, cfg, LANGID) == {
        "00": None, "01": "boilerplate", "02": "aspect_ratio", "03": "duplicate_url",
        "04": "duplicate_exact", "05": None, "06": "near_duplicate", "07": None, "08": "caption_empty",
        "09": "caption_too_long", "10": "non_english", "11": "low_resolution",
    }  # fmt: skip


def test_decide_switches() -> None:
    items = [facts("a", phash=0), facts("b", url="http://x/a.jpg", sha256="sha-a", phash=1)]
    off = FilterSection(dedup_url=False, dedup_exact=False, near_duplicate_distance=None)
    assert decide(items, off, LANGID) == {"a": None, "b": None}
    assert decide(items, FilterSection(dedup_url=False), LANGID)["b"] == "duplicate_exact"
    only_near = FilterSection(dedup_url=False, dedup_exact=False, near_duplicate_distance=0)
    assert decide(items, only_near, LANGID)["b"] is None
    assert decide(items, only_near.model_copy(update={"near_duplicate_distance": 1}), LANGID)["b"] == "near_duplicate"


def test_decide_missing_hashes_never_match() -> None:
    items = [facts("a", sha256=None, phash=None), facts("b", sha256=None, phash=None)]
    assert decide(items, CFG, LANGID) == {"a": None, "b": None}


def test_decide_order_independent() -> None:
    rng = random.Random(1)
    items = [
        facts(f"k{i:03d}", url=f"http://x/{rng.randrange(60)}", sha256=f"s{rng.randrange(60)}",
              caption=rng.choice(["a red circle on the left", "a blue square at the top", "IMG_1.jpg"]),
              phash=rng.getrandbits(64) if rng.random() < 0.5 else rng.choice([0, 1, 3, 7]))
        for i in range(200)
    ]  # fmt: skip
    expected = decide(items, CFG, LANGID)
    assert len(set(expected.values())) >= 4
    for _ in range(5):
        rng.shuffle(items)
        assert decide(items, CFG, LANGID) == expected


def test_decide_chain_compares_only_with_kept() -> None:
    a, b, c = 0, 0b111, 0b111111  # a~b (3 bits), b~c (3 bits), a!~c (6 bits)
    items = [facts("c", phash=c), facts("a", phash=a), facts("b", phash=b)]
    assert decide(items, FilterSection(near_duplicate_distance=4), LANGID) == {
        "a": None, "b": "near_duplicate", "c": None,
    }  # fmt: skip


def test_dropped_sample_does_not_shadow_later_duplicate() -> None:
    items = [
        facts("a", caption="IMG_0001.JPG", sha256="same", phash=0),
        facts("b", url="http://x/a.jpg", caption="IMG_0001.JPG", sha256="same", phash=0),
        facts("c", url="http://x/a.jpg", sha256="same", phash=1),
        facts("d", url="http://x/a.jpg", sha256="same", phash=1),
    ]
    assert decide(items, CFG, LANGID) == {"a": "boilerplate", "b": "boilerplate", "c": None, "d": "duplicate_url"}


def test_duplicate_keys_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate sample key"):
        decide([facts("a"), facts("a")], CFG, LANGID)


def brute_force_near(items: list[SampleFacts], distance: int) -> dict[str, str | None]:
    kept: list[int] = []
    out: dict[str, str | None] = {}
    for f in sorted(items, key=lambda f: f.key):
        if any(hamming(f.phash, k) <= distance for k in kept):
            out[f.key] = "near_duplicate"
        else:
            out[f.key] = None
            kept.append(f.phash)
    return out


@pytest.mark.parametrize("distance", [0, 1, 4, 7, 12, 32])
def test_near_duplicate_index_matches_brute_force(distance: int) -> None:
    rng = random.Random(distance)
    hashes = [rng.getrandbits(64) for _ in range(250)]
    for _ in range(250):
        h = rng.choice(hashes)
        for bit in rng.sample(range(64), rng.choice([0, 1, distance, distance + 1, distance + 2, rng.randrange(40)])):
            h ^= 1 << bit
        hashes.append(h)
    rng.shuffle(hashes)
    items = [facts(f"{i:04d}", phash=h) for i, h in enumerate(hashes)]
    cfg = FilterSection(languages=(), dedup_url=False, dedup_exact=False, near_duplicate_distance=distance)
    got = decide(items, cfg, LANGID)
    assert got == brute_force_near(items, distance)
    assert 0 < sum(r is not None for r in got.values()) < len(items)


def test_count_reasons() -> None:
    rng = random.Random(3)
    items = [
        facts(f"{i:03d}", url=f"u{rng.randrange(80)}", caption=rng.choice(["", "untitled", "a red circle on top", "x"]),
              original_width=rng.choice([256, 20, 600]), phash=rng.getrandbits(3))
        for i in range(300)
    ]  # fmt: skip
    counts = count_reasons(decide(items, CFG, LANGID))
    assert list(counts) == [*REASONS, "kept"]
    assert sum(counts.values()) == len(items)
    assert counts["duplicate_exact"] == 0 and counts["kept"] > 0
    assert count_reasons({}) == dict.fromkeys([*REASONS, "kept"], 0)
    with pytest.raises(ValueError, match="unknown drop reason"):
        count_reasons({"a": "kept"})
