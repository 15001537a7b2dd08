"""Text tokenizer: lowercase BPE, fixed positions with <pad>, dropout only when asked."""

import numpy as np
import pytest

from pipeline.models.bpe import TextTokenizer, train_tokenizer

CAPTIONS = [
    f"a {s} {c} {shape} on the {p}"
    for s in ("small", "large")
    for c in ("red", "blue", "green", "yellow")
    for shape in ("circle", "square", "triangle")
    for p in ("left", "right", "top")
] * 3


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, vocab_size=300)


def test_training_is_deterministic(tok):
    again = train_tokenizer(CAPTIONS, vocab_size=300)
    assert again.to_str() == tok.to_str()


def test_encode_pads_to_text_len_and_round_trips(tok):
    text = TextTokenizer(tok, text_len=16)
    ids = text.encode("A Small RED circle on the left")
    assert ids.shape == (16,) and ids.dtype == np.int32
    n = int((ids != text.pad_id).sum())
    assert 0 < n < 16 and (ids[n:] == text.pad_id).all()
    assert text.decode(ids).strip() == "a small red circle on the left"


def test_frequent_words_become_single_tokens(tok):
    text = TextTokenizer(tok, text_len=16)
    assert len(text.ids("triangle")) == 1


def test_long_captions_are_truncated(tok):
    text = TextTokenizer(tok, text_len=8)
    ids = text.encode(" ".join(["circle"] * 50))
    assert ids.shape == (8,) and (ids != text.pad_id).all()


def test_unseen_characters_have_no_unknown_token(tok):
    text = TextTokenizer(tok, text_len=64)
    assert text.decode(text.encode("zebra ✓ 東京")).strip() == "zebra ✓ 東京"


def test_bpe_dropout_varies_the_encoding_only_when_asked(tok):
    text = TextTokenizer(tok, text_len=64, dropout=0.5)
    caption = "a large yellow triangle on the right"
    plain = {tuple(text.encode(caption)) for _ in range(20)}
    dropped = {tuple(text.encode(caption, dropout=True)) for _ in range(20)}
    assert len(plain) == 1
    assert len(dropped) > 1
    assert all(text.decode(d).strip() == caption for d in dropped)
