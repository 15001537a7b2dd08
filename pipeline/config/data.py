"""Recipe sections of the data stages (ingest, filter, text-tokenizer) and the synthetic dataset's config."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import Config


class SyntheticConfig(Config):
    """The embedded captioned-shapes dataset, served over a loopback HTTP server."""

    count: int = Field(400, ge=10, le=1_000_000)
    """Number of clean rendered image-caption pairs (the crawl defects are added on top)."""
    seed: int = 0
    """Seed for everything random in the dataset; the same seed gives the same bytes."""
    image_size: int = Field(96, ge=32, le=1024)
    """Side in pixels of the rendered (square) images before ingest resizes them."""
    two_object_fraction: float = Field(0.4, ge=0.0, le=1.0)
    """Fraction of clean samples that show two objects and a relation between them."""
    defect_fraction: float = Field(0.25, ge=0.0, le=2.0)
    """Number of crawl-defect rows (dead hosts, 404s, duplicates, bad captions...) per clean row."""
    heldout_pairs: int = Field(3, ge=0, le=20)
    """Number of (colour, shape) combinations never shown in the training data, kept for evaluation."""
    latency_ms: float = Field(0.0, ge=0, le=10_000)
    """Delay the server adds to every answer, to mimic slow hosts (tests, benchmarks)."""
    port: int = Field(0, ge=0, le=65535)
    """Loopback port of the server; 0 picks a free one (kept in the source folder for resumes)."""


class IngestSection(Config):
    """Download URL lists into raw webdataset shards with img2dataset."""

    # The limits came in 7d330f3. They refuse hostile rows (bombs, huge bodies, private addresses)
    # that the releases before fetched; an ingest started before them continues under them.
    added_fields = {
        "max_pixels": 89_478_485,
        "max_bytes": 32 << 20,
        "allow_private_addresses": False,
        "allow_networks": [],
    }

    url_lists: tuple[str, ...] = ()
    """URL list files (parquet, csv or tsv; local paths or fsspec URLs). Empty when `synthetic` is set."""
    url_col: str = "url"
    """Column holding the image URL in the URL lists."""
    caption_col: str = "caption"
    """Column holding the caption in the URL lists."""
    extra_cols: tuple[str, ...] = ()
    """More URL-list columns to keep in each sample's json (e.g. `license`)."""
    synthetic: SyntheticConfig | None = None
    """Generate and serve the synthetic dataset instead of reading `url_lists`."""
    image_size: int = Field(256, ge=8, le=4096)
    """Side in pixels of the stored images."""
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    """img2dataset resize mode."""
    encode_quality: int = Field(95, ge=1, le=100)
    """JPEG quality of the stored images."""
    shard_size: int = Field(10_000, ge=1, le=1_000_000)
    """URL-list rows per shard (one shard task each)."""
    threads: int = Field(64, ge=1, le=1024)
    """Download threads per shard task."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds one socket operation of a download (connect, one read) may wait."""
    download_deadline_s: float = Field(60.0, gt=0)
    """Seconds a whole download (its redirects included) may take; one past it is stopped
    (`too_slow`): `timeout_s` bounds one read, so a server sending a byte a second would hold a
    download thread for hours. 60 s fetches `max_bytes` (32 MiB) at about 0.5 MiB/s."""
    retries: int = Field(0, ge=0, le=10)
    """Download retries per URL."""
    max_task_retries: int = Field(2, ge=0, le=100)
    """Times a failed shard task is retried before the stage fails."""
    max_pixels: int = Field(89_478_485, ge=1, le=178_956_970)
    """Images whose header declares more pixels are refused before decoding (`too_many_pixels`):
    decompression bombs. The default is PIL's warning limit; PIL refuses twice it outright."""
    max_bytes: int = Field(32 << 20, ge=1024)
    """A download is stopped once it passes this many bytes (`too_many_bytes`); a declared
    Content-Length above it is refused before the body is read."""
    allow_private_addresses: bool = False
    """Fetch from loopback, private, link-local (cloud metadata), multicast and reserved addresses
    too. Off, those connections are refused (`disallowed_address`), after DNS and on every redirect."""
    allow_networks: tuple[str, ...] = ()
    """CIDR networks fetched from although the address check refuses them (e.g. `10.1.0.0/16` for
    an internal image mirror), without opening every private range."""
    warn_failed_share: float | None = Field(0.3, ge=0.0, le=1.0)
    """Above this share of URL-list rows that did not download (any failure reason), the stage
    warns in one line at its end, naming the share and its top reasons, and `dalle status` shows
    it. 0.3 sits above the 10-30% of dead links aged web lists (LAION, CC12M) lose; null: never."""
    max_failed_share: float | None = Field(None, ge=0.0, le=1.0)
    """Above this share of failed rows the stage fails (exit 1) once its shards are done; they stay
    committed, so a rerun with a higher value (or null) finishes without downloading them again.
    null: never fails for its failed rows."""

    # How long to wait and whether to pass decide no shard's bytes beyond the network's own timing:
    # a resumed run may change them
    execution_only = frozenset({"download_deadline_s", "warn_failed_share", "max_failed_share"})

    @model_validator(mode="after")
    def _one_source(self) -> IngestSection:
        if self.synthetic is None and not self.url_lists:
            raise ValueError("give either url_lists or synthetic")
        if self.synthetic is not None and self.url_lists:
            raise ValueError("give url_lists or synthetic, not both")
        if self.download_deadline_s < self.timeout_s:
            raise ValueError(
                f"download_deadline_s {self.download_deadline_s:g} is below timeout_s {self.timeout_s:g}: "
                "a download may take no less than one of its reads"
            )
        for network in self.allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"allow_networks: {network!r} is not an IP network (e.g. 10.1.0.0/16)") from None
        return self


DEFAULT_BOILERPLATE = (
    r"^\s*(img|dsc|dscn|dcim|pxl|image|photo|p)[-_ ]?\d+(\.\w{2,4})?\s*$",
    r"\.(jpe?g|png|gif|webp|bmp|tiff?)\s*$",
    r"\b(photographed|taken|captured|uploaded|posted) on \d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b",
    r"^\s*(untitled|no caption|image|photo|picture|stock photo|thumbnail)\s*$",
    r"\bstock (photo|image|illustration)\b",
)


class FilterSection(Config):
    """The paper's caption and image rules, dedup, and re-sharding of the survivors."""

    min_caption_words: int = Field(3, ge=0)
    """Captions with fewer words are dropped (`caption_too_short`; empty ones are `caption_empty`)."""
    max_caption_words: int = Field(200, ge=1)
    """Captions with more words are dropped (`caption_too_long`)."""
    languages: tuple[str, ...] = ("en",)
    """ISO 639-1 codes kept by the language identifier (py3langid); empty keeps every language."""
    min_language_confidence: float = Field(0.5, ge=0.0, le=1.0)
    """A caption is dropped as `non_english` only when another language wins with this probability."""
    boilerplate_patterns: tuple[str, ...] = DEFAULT_BOILERPLATE
    """Case-insensitive regexes; a caption matching any is dropped (`boilerplate`)."""
    min_aspect_ratio: float = Field(0.5, gt=0)
    """Original width/height below this is dropped (`aspect_ratio`); the paper keeps [1/2, 2]."""
    max_aspect_ratio: float = Field(2.0, gt=0)
    """Original width/height above this is dropped (`aspect_ratio`)."""
    min_image_size: int = Field(64, ge=0)
    """Images whose original shorter side is below this are dropped (`low_resolution`)."""
    dedup_url: bool = True
    """Drop later samples with an already seen URL (`duplicate_url`)."""
    dedup_exact: bool = True
    """Drop later samples with the same caption and original image bytes (`duplicate_exact`)."""
    near_duplicate_distance: int | None = Field(4, ge=0, le=32)
    """Hamming distance of 64-bit perceptual hashes at or below which an image is a near duplicate
    of an earlier kept one (`near_duplicate`); null turns the check off."""
    shard_size: int = Field(10_000, ge=1, le=1_000_000)
    """Samples per filtered shard (the last one may be smaller)."""
    dedup_rows_per_task: int = Field(1_000_000, ge=1, le=100_000_000)
    """Scanned rows one dedup task holds (a group of raw shards, or a hash bucket): bounds a task's
    memory, at roughly 200 bytes per row. The decisions do not depend on it."""

    execution_only = frozenset({"dedup_rows_per_task"})

    @model_validator(mode="after")
    def _ranges(self) -> FilterSection:
        if self.min_aspect_ratio > self.max_aspect_ratio:
            raise ValueError("min_aspect_ratio is above max_aspect_ratio")
        if self.min_caption_words > self.max_caption_words:
            raise ValueError("min_caption_words is above max_caption_words")

        for pattern in self.boilerplate_patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"boilerplate pattern {pattern!r} is not a regex: {err}") from None
        return self


class TextTokenizerSection(Config):
    """BPE tokenizer trained on the filtered captions (HF `tokenizers`)."""

    vocab_size: int = Field(16384, ge=64, le=1_000_000)
    """Target vocabulary size (the paper: 16384); a small corpus may stop below it."""
    text_len: int = Field(256, ge=1, le=4096)
    """Text positions per caption (the paper: 256); longer captions are truncated."""
    lowercase: bool = True
    """Lowercase captions before tokenizing (the paper does)."""
    bpe_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """BPE dropout used when encoding for training (the paper: 0.1); 0 at evaluation."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to become a merge."""
    max_captions: int | None = Field(10_000_000, ge=1)
    """Captions the tokenizer trains on: a deterministic sample of about this many (by a hash of
    each sample's key), streamed from the filtered shards, as sentencepiece's input_sentence_size;
    null trains on every caption."""
