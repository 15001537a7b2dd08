"""The text tokenizer: lowercase byte-level BPE (HF `tokenizers`), captions → `text_len` positions.

Id 0 is `<pad>`: it marks positions with no text token (the transformer replaces it with a
learned padding token per position). Byte-level BPE encodes any string without an unknown token.
BPE dropout (Provilkov et al. 2020; the paper: 0.1) applies only when asked for, at training time,
from a caller's seeded generator: at each merge step every applicable merge is skipped with
probability p and the best remaining one is applied, until none remains. Training seeds it from
(seed, epoch, key) so a resumed run draws exactly the segmentations of an uninterrupted one (the
`tokenizers` library's own dropout draws from an unseeded thread-local generator).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pipeline import storage

PAD = "<pad>"


def train_tokenizer(
    captions: Iterable[str], *, vocab_size: int, min_frequency: int = 2, lowercase: bool = True
) -> Tokenizer:
    """Trains a BPE tokenizer of at most `vocab_size` tokens on `captions` (merges of pairs seen at
    least `min_frequency` times); deterministic for the same captions in the same order."""
    tok = Tokenizer(models.BPE())
    steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    return tok


BPE_DROPOUT, EMPTY_CAPTION = 0, 1
"""The streams of `caption_rng`: one independent generator per kind of draw."""


def caption_rng(seed: int, epoch: int, key: str, stream: int = BPE_DROPOUT) -> np.random.Generator:
    """The generator of one sample's caption draws (`stream`: BPE dropout, or whether its caption is
    replaced by the empty one) in one epoch of a run."""
    digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    entropy = [seed & 0xFFFFFFFF, epoch, digest >> 32, digest & 0xFFFFFFFF]
    return np.random.default_rng(entropy + [stream] if stream else entropy)


def merge_word(symbols: list[str], ranks: dict[tuple[str, str], int], p: float, rng: np.random.Generator) -> list[str]:
    """BPE on one pre-tokenized word: the lowest-ranked applicable merge (leftmost on ties) is
    applied, each candidate first skipped with probability `p`; stops when none is left."""
    while len(symbols) > 1:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if p > 0 and found:
            found = [c for c, skip in zip(found, rng.random(len(found)) < p) if not skip]
        if not found:
            break
        _, i = min(found)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


class TextTokenizer:
    """Encodes captions to fixed-length id arrays, with BPE dropout when given a rate and a generator."""

    def __init__(self, tokenizer: Tokenizer, text_len: int):
        self.text_len = text_len
        self.pad_id = tokenizer.token_to_id(PAD)
        if self.pad_id is None:
            raise ValueError(f"tokenizer has no {PAD} token")
        self._plain = tokenizer
        self._ranks: dict[tuple[str, str], int] | None = None
        self._vocab: dict[str, int] = {}

    @classmethod
    def load(cls, url: str, text_len: int) -> TextTokenizer:
        return cls(Tokenizer.from_str(storage.read_bytes(url).decode()), text_len)

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size()

    def _merge_ranks(self) -> dict[tuple[str, str], int]:
        if self._ranks is None:
            model = json.loads(self._plain.to_str())["model"]
            merges = (tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"])
            self._ranks = {pair: rank for rank, pair in enumerate(merges)}
            self._vocab = model["vocab"]
        return self._ranks

    def ids(self, caption: str, dropout: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
        """Token ids of the caption, untruncated; with `dropout` > 0, a BPE-dropout segmentation
        drawn from `rng` (the same generator state gives the same ids)."""
        if dropout == 0:
            return self._plain.encode(caption).ids
        if rng is None:
            raise ValueError("BPE dropout needs a generator")
        return self._merged_ids(caption, dropout, rng)

    def _merged_ids(self, caption: str, p: float, rng: np.random.Generator) -> list[int]:
        ranks = self._merge_ranks()
        tok = self._plain
        text = tok.normalizer.normalize_str(caption) if tok.normalizer else caption
        out: list[int] = []
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(text):
            out.extend(self._vocab[s] for s in merge_word(list(word), ranks, p, rng))
        return out

    def encode(self, caption: str, dropout: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        """`text_len` int32 ids: the caption's tokens (truncated), then `pad_id`."""
        return self.pad(self.ids(caption, dropout, rng))

    def pad(self, ids: list[int]) -> np.ndarray:
        """`ids` truncated or padded with `pad_id` to `text_len` int32 positions."""
        out = np.full(self.text_len, self.pad_id, dtype=np.int32)
        ids = ids[: self.text_len]
        out[: len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._plain.decode([int(i) for i in ids if int(i) != self.pad_id])
