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


# -- the stage's caption stream --------------------------------------------------------------------
def filter_stage(tmp_path, shards: int = 4, per_shard: int = 250) -> str:
    """A filter folder of committed shards (manifests only: the stream reads nothing else)."""
    import pyarrow as pa

    from pipeline import storage
    from pipeline.engine.ledger import Ledger, ShardRecord

    url = str(tmp_path / "filter")
    ledger = Ledger(url)
    for s in range(shards):
        keys = [f"{s:05d}{i:04d}" for i in range(per_shard)]
        captions = [CAPTIONS[(s * per_shard + i) % len(CAPTIONS)] for i in range(per_shard)]
        storage.write_parquet(ledger.path(f"{s:05d}.parquet"), pa.table({"key": keys, "caption": captions}))
        ledger.commit(ShardRecord(f"{s:05d}", per_shard, per_shard, (f"{s:05d}.tar", f"{s:05d}.parquet"), "c", "f"))
    return url


def test_the_stream_yields_every_caption_in_key_order_under_the_cap(tmp_path):
    from pipeline.stages.text_tokenizer import CaptionStream

    stream = CaptionStream(filter_stage(tmp_path), max_captions=None)
    captions = list(stream)
    assert captions == [CAPTIONS[i % len(CAPTIONS)] for i in range(1000)] and stream.yielded == 1000
    assert (
        train_tokenizer(CaptionStream(filter_stage(tmp_path), 5000), vocab_size=300).to_str()
        == train_tokenizer(captions, vocab_size=300).to_str()
    )


def test_max_captions_takes_the_same_sample_every_time(tmp_path):
    from pipeline.stages.text_tokenizer import CaptionStream

    url = filter_stage(tmp_path)
    first, again = CaptionStream(url, max_captions=300), CaptionStream(url, max_captions=300)
    assert list(first) == list(again)
    assert 240 <= first.yielded <= 360  # about 300 of 1000


def test_the_stage_trains_on_the_stream_and_measures_a_sample(tmp_path):
    import json

    from pipeline.config.data import TextTokenizerSection
    from pipeline.engine.ledger import Attempt, Ledger
    from pipeline.stages.text_tokenizer import CaptionStream, train_on

    cfg = TextTokenizerSection(vocab_size=300, text_len=6, max_captions=600)
    attempt = Attempt(Ledger(str(tmp_path / "tok")), "tokenizer", "f")
    result = attempt.commit(train_on(CaptionStream(filter_stage(tmp_path), cfg.max_captions), cfg, attempt))
    stats = json.loads((tmp_path / "tok" / "stats.json").read_text())
    assert result.samples_in == stats["trained_on"] == stats["stats_sample"] and 500 < result.samples_in < 700
    assert stats["mean_tokens"] > 6 and stats["truncated_share"] > 0.5  # "a small red circle on the left" > 6
