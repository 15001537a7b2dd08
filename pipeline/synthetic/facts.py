"""Synthetic filter scan output at any size: what the scan phase would record for N samples, with a
known share of URL, exact and near duplicates and a skewed band (for the dedup's benchmark and
tests, without downloading or decoding a single image).

Rows are in key order, `shard_size` per raw shard, keys as img2dataset writes them. A planted
duplicate always copies an earlier row, so with no other coincidences it is the one dropped:
- url: the same URL as an earlier original row (caption and image may differ);
- exact: a new URL with an earlier row's caption (re-spaced, re-cased) and sha256;
- near: an earlier row's perceptual hash with 1..`near_bits` bits flipped (chains form when the
  earlier row is itself a near copy);
- blank: phash 0 (a million blank images), and `skew` rows sharing one band value but otherwise
  random (a skewed bucket that must not make one task quadratic).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

WORDS = ("red", "blue", "green", "small", "large", "circle", "square", "star", "on", "the", "left", "right")


def scan_tables(
    rows: int,
    *,
    shard_size: int = 10_000,
    dup_rate: float = 0.1,
    near: bool = True,
    near_bits: int = 3,
    blank: float = 0.01,
    skew: float = 0.01,
    seed: int = 0,
) -> Iterator[tuple[str, pa.Table]]:
    """(raw shard id, scan table) per shard, rows in key order. `dup_rate` is split evenly over
    the planted kinds (url, exact and, with `near`, near)."""
    rng = np.random.default_rng(seed)
    kinds = ["url", "exact", "near"] if near else ["url", "exact"]
    kind = rng.choice([*kinds, "new"], size=rows, p=[dup_rate / len(kinds)] * len(kinds) + [1 - dup_rate])
    kind[0] = "new"
    source = (rng.random(rows) * np.arange(rows)).astype(np.int64)  # an earlier row
    # a URL is copied from an original (as re-posted links are), so a URL group's first row is
    # never a planted duplicate of another kind
    originals = np.flatnonzero(kind == "new")
    is_url = np.flatnonzero(kind == "url")
    before = np.searchsorted(originals, is_url)
    source[is_url] = originals[(rng.random(len(is_url)) * before).astype(np.int64)]
    phash = rng.integers(0, 2**63, size=rows, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    phash |= rng.integers(0, 2, size=rows).astype(np.uint64)
    if near:
        special = rng.random(rows)
        phash[special < blank] = 0
        band = (special >= blank) & (special < blank + skew)
        phash[band] &= np.uint64((1 << 51) - 1)  # the top 13 bits (one band at distance 4) all zero
    flips = rng.integers(1, near_bits + 1, size=rows)
    bits = rng.integers(0, 64, size=(rows, near_bits)).astype(np.uint64)
    captions = [" ".join(rng.choice(WORDS, size=6)) for _ in range(min(rows, 50_000))]
    caption_of = rng.integers(0, len(captions), size=rows)
    url = np.arange(rows)
    sha = np.arange(rows)
    respace = np.zeros(rows, dtype=bool)
    for i in np.flatnonzero(kind != "new"):
        s = source[i]
        if kind[i] == "url":
            url[i] = url[s]
        elif kind[i] == "exact":
            sha[i], caption_of[i], respace[i] = sha[s], caption_of[s], True
        else:
            mask = np.uint64(0)
            for b in bits[i, : flips[i]]:
                mask |= np.uint64(1) << b
            phash[i] = phash[s] ^ mask
    digits = max(5, len(str(-(-rows // shard_size))))
    width = len(str(shard_size - 1)) if shard_size > 1 else 1
    for shard_id, start in enumerate(range(0, rows, shard_size)):
        idx = np.arange(start, min(start + shard_size, rows))
        shard = f"{shard_id:0{digits}d}"
        caption = [captions[caption_of[i]] for i in idx]
        caption = [f" {c.upper()}  " if respace[i] else c for c, i in zip(caption, idx)]
        yield (
            shard,
            pa.table(
                {
                    "key": [f"{shard}{i - start:0{width}d}" for i in idx],
                    "url": [f"http://img.example/{url[i]}.jpg" for i in idx],
                    "caption": caption,
                    "sha256": [f"{sha[i]:064x}" for i in idx],
                    "phash": pa.array(phash[idx], pa.uint64()),
                    "original_width": pa.array(np.full(len(idx), 256), pa.int32()),
                    "original_height": pa.array(np.full(len(idx), 256), pa.int32()),
                    "source_shard": [shard] * len(idx),
                    "reason": pa.array([None] * len(idx), pa.string()),
                }
            ),
        )
