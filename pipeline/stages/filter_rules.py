"""The DALL·E paper's per-sample data filter rules, as pure functions (no Ray, no I/O).

The filter stage's scan applies them to every sample once, recording its facts (with `phash64`)
for the dedup (`pipeline.stages.dedup_rules`). The rules:

* caption rules (`caption_reason`): empty, boilerplate, too few or too many words, not in the
  configured languages (py3langid);
* image rules (`image_reason`): the original aspect ratio outside [1/2, 2] by default, the original
  shorter side below `min_image_size`.

Decisions depend only on the sample, never on the order of samples or on the machine.
"""

from __future__ import annotations

import functools
import re

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


def sample_reason(
    caption: str | None, width: int | None, height: int | None, cfg: FilterSection, langid: LanguageID
) -> str | None:
    """The per-sample rules: `caption_reason`, then `image_reason`."""
    return caption_reason(caption, cfg, langid) or image_reason(width, height, cfg)
