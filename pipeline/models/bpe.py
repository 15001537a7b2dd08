"""The text tokenizer: lowercase byte-level BPE (HF `tokenizers`), captions → `text_len` positions.

Id 0 is `<pad>`: it marks positions with no text token (the transformer replaces it with a
learned padding token per position). Byte-level BPE encodes any string without an unknown token.
BPE dropout (the paper: 0.1) applies only when asked for, at training time.
"""

from __future__ import annotations

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


class TextTokenizer:
    """Encodes captions to fixed-length id arrays; `dropout` > 0 gives BPE-dropout encodings."""

    def __init__(self, tokenizer: Tokenizer, text_len: int, dropout: float = 0.0):
        self.text_len = text_len
        self.pad_id = tokenizer.token_to_id(PAD)
        if self.pad_id is None:
            raise ValueError(f"tokenizer has no {PAD} token")
        self._plain = tokenizer
        self._dropout = Tokenizer.from_str(tokenizer.to_str())
        if dropout > 0:
            self._dropout.model.dropout = dropout

    @classmethod
    def load(cls, url: str, text_len: int, dropout: float = 0.0) -> TextTokenizer:
        return cls(Tokenizer.from_str(storage.read_bytes(url).decode()), text_len, dropout)

    @property
    def vocab_size(self) -> int:
        return self._plain.get_vocab_size()

    def ids(self, caption: str, dropout: bool = False) -> list[int]:
        """Token ids of the caption, untruncated."""
        return (self._dropout if dropout else self._plain).encode(caption).ids

    def encode(self, caption: str, dropout: bool = False) -> np.ndarray:
        """`text_len` int32 ids: the caption's tokens (truncated), then `pad_id`."""
        return self.pad(self.ids(caption, dropout))

    def pad(self, ids: list[int]) -> np.ndarray:
        """`ids` truncated or padded with `pad_id` to `text_len` int32 positions."""
        out = np.full(self.text_len, self.pad_id, dtype=np.int32)
        ids = ids[: self.text_len]
        out[: len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._plain.decode([int(i) for i in ids if int(i) != self.pad_id])
