"""The DALL·E paper's data filter rules, as pure functions (no Ray, no I/O).

The filter stage scans every sample once, recording a `SampleFacts` per sample, and then calls
`decide` on all of them. The rules:

* caption rules (`caption_reason`): empty, boilerplate, too few or too many words, not in the
  configured languages (py3langid);
* image rules (`image_reason`): the original aspect ratio outside [1/2, 2] by default, the original
  shorter side below `min_image_size`;
* dedup (`decide`): the same URL, the same caption and image bytes, or a perceptual hash
  (`phash64`) within a Hamming distance of an earlier kept sample.

Decisions depend only on the set of samples, never on their order or on the machine.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.config.data import FilterSection

REASONS: tuple[str, ...] = (
    "caption_empty",
    "caption_too_short",
    "caption_too_long",
    "non_english",
    "boilerplate",
    "aspect_ratio",
    "low_resolution",
    "duplicate_url",
    "duplicate_exact",
    "near_duplicate",
)
_REASON_SET = frozenset(REASONS)


@functools.cache
def _identifier():  # py3langid's LanguageIdentifier, which is untyped
    # Imported and loaded on first use: the model takes most of a second to decompress, and
    # processes that never classify a caption (or unpickle a LanguageID) should not pay for it.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageID:
    """py3langid with probabilities normalized over its languages.

    Holds no state of its own, so it pickles to a few bytes (e.g. into Ray tasks); the model is
    loaded once per process, on the first `classify`.
    """

    def classify(self, text: str) -> tuple[str, float]:
        """The most likely ISO 639 language code of `text` and its probability in [0, 1]."""
        lang, prob = _identifier().classify(text)
        return lang, float(prob)


@functools.lru_cache(maxsize=32)
def _boilerplate_regexes(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    # Compiled separately rather than joined into one alternation: a pattern that is valid alone
    # (e.g. one starting with an inline flag such as "(?s)") can be invalid inside a group.
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def caption_reason(caption: str | None, cfg: FilterSection, langid: LanguageID) -> str | None:
    """Why the caption drops its sample, or None when it passes.

    Rules are tried in this order, the first that fires names the reason:
    `caption_empty` (None or only whitespace), `boilerplate` (any of `cfg.boilerplate_patterns`
    found anywhere, case-insensitively), `caption_too_short` / `caption_too_long` (whitespace
    separated words against `cfg.min_caption_words` / `cfg.max_caption_words`), `non_english`
    (only when `cfg.languages` is non-empty: the identifier's top language is not one of them and
    has probability >= `cfg.min_language_confidence`).

    Boilerplate comes before the word counts because file names and camera captions such as
    "IMG_1234.JPG" are one word, and "boilerplate" says more about them than "too short".
    Unsegmented scripts (Chinese, Japanese, Thai) count as one word per whitespace-separated run.
    """
    if caption is None or not caption.strip():
        return "caption_empty"
    if any(regex.search(caption) for regex in _boilerplate_regexes(tuple(cfg.boilerplate_patterns))):
        return "boilerplate"
    words = len(caption.split())
    if words < cfg.min_caption_words:
        return "caption_too_short"
    if words > cfg.max_caption_words:
        return "caption_too_long"
    if cfg.languages:
        lang, prob = langid.classify(caption)
        if lang not in cfg.languages and prob >= cfg.min_language_confidence:
            return "non_english"
    return None


def image_reason(original_width: int | None, original_height: int | None, cfg: FilterSection) -> str | None:
    """Why the original image size drops its sample (`aspect_ratio`, `low_resolution`), or None.

    The aspect ratio is width / height, kept when inside [min_aspect_ratio, max_aspect_ratio]
    inclusive. Missing or non-positive sizes count as `low_resolution`: nothing is known to be
    large enough.
    """
    if original_width is None or original_height is None or original_width <= 0 or original_height <= 0:
        return "low_resolution"
    aspect = original_width / original_height
    if aspect < cfg.min_aspect_ratio or aspect > cfg.max_aspect_ratio:
        return "aspect_ratio"
    if min(original_width, original_height) < cfg.min_image_size:
        return "low_resolution"
    return None


_PHASH_SIDE = 32
_PHASH_BLOCK = 8


@functools.cache
def _dct_matrix() -> np.ndarray:
    # Unscaled DCT-II rows (scipy.fftpack's type-II up to a factor 2). The orthonormal variant
    # would shrink row and column 0 by 1/sqrt(2) and move them against the median, changing bits.
    n = np.arange(_PHASH_SIDE)
    k = np.arange(_PHASH_BLOCK)[:, None]
    return np.cos(np.pi * (2 * n + 1) * k / (2 * _PHASH_SIDE))


def phash64(image: Image.Image) -> int:
    """64-bit DCT perceptual hash, the same definition as `imagehash.phash` (hash_size=8).

    The image is converted to 8-bit grayscale ("L", alpha ignored), resized to 32x32 with LANCZOS,
    transformed with a 2-D DCT-II, and the 8x8 lowest-frequency block (DC included) is kept. Bit
    i (row-major over that block) is 1 when the coefficient is above the median of all 64 of them;
    bit 0 is the most significant bit of the result, so `f"{h:016x}"` equals imagehash's string.
    """
    small = image.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    dct = _dct_matrix()
    block = dct @ pixels @ dct.T
    # BLAS sums in a machine-dependent order; rounding away its last-bit noise keeps exact ties
    # (e.g. the all-zero AC terms of a flat image) ties on every machine.
    block = np.round(block, 6)
    bits = (block > np.median(block)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    """Number of differing bits of two hashes."""
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class SampleFacts:
    """What the filter's scan phase records per sample; everything `decide` needs."""

    key: str
    url: str
    caption: str
    sha256: str | None
    phash: int | None
    original_width: int | None
    original_height: int | None


def normalize_caption(caption: str) -> str:
    """The caption as compared by `duplicate_exact`: lowercased, whitespace runs collapsed."""
    return " ".join(caption.split()).lower()


class _NearIndex:
    """Hashes within `distance` of any inserted hash, found without comparing against all of them.

    Pigeonhole: the 64 bits are cut into distance + 1 bands; d <= distance differing bits can spoil
    at most d bands, so a near hash equals an inserted one exactly on at least one band. Only the
    hashes sharing a band are compared bit by bit.
    """

    def __init__(self, distance: int) -> None:
        self._distance = distance
        edges = [round(i * 64 / (distance + 1)) for i in range(distance + 2)]
        # (shift, mask, buckets) per band; a bucket lists the inserted hashes with that band value.
        self._bands: list[tuple[int, int, dict[int, list[int]]]] = [
            (lo, (1 << (hi - lo)) - 1, {}) for lo, hi in itertools.pairwise(edges)
        ]

    def near(self, h: int) -> bool:
        for shift, mask, buckets in self._bands:
            # Inlined hamming(): this loop is the hot path of a large dedup.
            if any((h ^ other).bit_count() <= self._distance for other in buckets.get((h >> shift) & mask, ())):
                return True
        return False

    def add(self, h: int) -> None:
        for shift, mask, buckets in self._bands:
            buckets.setdefault((h >> shift) & mask, []).append(h)


def sample_reason(
    caption: str | None, width: int | None, height: int | None, cfg: FilterSection, langid: LanguageID
) -> str | None:
    """The per-sample rules: `caption_reason`, then `image_reason`."""
    return caption_reason(caption, cfg, langid) or image_reason(width, height, cfg)


def dedup(facts: list[SampleFacts], cfg: FilterSection) -> dict[str, str | None]:
    """Maps each key to `duplicate_url`, `duplicate_exact`, `near_duplicate` or None (kept).

    Samples are processed in key order whatever the input order, so the result depends only on the
    set of samples: each is compared with the samples kept so far. Dropped samples never enter the
    indexes: with A ~ B ~ C but A !~ C, B is dropped as A's duplicate and C is kept. Samples without
    a sha256 are never exact duplicates; without a phash, never near duplicates.

    Raises ValueError when two facts share a key (their order would decide which is kept).
    """
    ordered = sorted(facts, key=lambda f: f.key)
    for prev, cur in zip(ordered, ordered[1:]):
        if prev.key == cur.key:
            raise ValueError(f"duplicate sample key {cur.key!r}")
    distance = cfg.near_duplicate_distance
    near_index = _NearIndex(distance) if distance is not None else None
    seen_urls: set[str] = set()
    seen_exact: set[tuple[str, str]] = set()
    decisions: dict[str, str | None] = {}
    for f in ordered:
        reason = _duplicate_reason(f, cfg, seen_urls, seen_exact, near_index)
        decisions[f.key] = reason
        if reason is None:
            seen_urls.add(f.url)
            if f.sha256 is not None:
                seen_exact.add((normalize_caption(f.caption), f.sha256))
            if near_index is not None and f.phash is not None:
                near_index.add(f.phash)
    return decisions


def decide(facts: list[SampleFacts], cfg: FilterSection, langid: LanguageID) -> dict[str, str | None]:
    """Maps each sample key to its drop reason, or to None when the sample is kept: the per-sample
    rules first (`sample_reason`), then `dedup` over the survivors."""
    decisions = {f.key: sample_reason(f.caption, f.original_width, f.original_height, cfg, langid) for f in facts}
    if len(decisions) != len(facts):
        dedup(facts, cfg)  # raises on the duplicate key
    decisions.update(dedup([f for f in facts if decisions[f.key] is None], cfg))
    return decisions


def _duplicate_reason(
    f: SampleFacts,
    cfg: FilterSection,
    seen_urls: set[str],
    seen_exact: set[tuple[str, str]],
    near_index: _NearIndex | None,
) -> str | None:
    if cfg.dedup_url and f.url in seen_urls:
        return "duplicate_url"
    if cfg.dedup_exact and f.sha256 is not None and (normalize_caption(f.caption), f.sha256) in seen_exact:
        return "duplicate_exact"
    if near_index is not None and f.phash is not None and near_index.near(f.phash):
        return "near_duplicate"
    return None


def count_reasons(decisions: Mapping[str, str | None]) -> dict[str, int]:
    """Number of samples per drop reason (every reason of REASONS, zeros included) plus "kept"."""
    counts = dict.fromkeys((*REASONS, "kept"), 0)
    for reason in decisions.values():
        if reason is not None and reason not in _REASON_SET:
            raise ValueError(f"unknown drop reason {reason!r}")
        counts["kept" if reason is None else reason] += 1
    return counts
