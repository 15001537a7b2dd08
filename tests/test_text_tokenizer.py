"""Text tokenizer: lowercase BPE, fixed positions with <pad>, dropout only when asked."""

import numpy as np
import pytest

from pipeline.models.bpe import TextTokenizer, caption_rng, train_tokenizer

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
    text = TextTokenizer(tok, text_len=64)
    caption = "a large yellow triangle on the right"
    plain = {tuple(text.encode(caption)) for _ in range(20)}
    rng = np.random.default_rng(0)
    dropped = {tuple(text.encode(caption, 0.5, rng)) for _ in range(20)}
    assert len(plain) == 1
    assert len(dropped) > 1
    assert all(text.decode(d).strip() == caption for d in dropped)


def test_bpe_dropout_at_rate_zero_is_the_library_encoding(tok):
    """The seeded merge loop at p = 0 segments exactly as `tokenizers` does."""
    text = TextTokenizer(tok, text_len=64)
    rng = np.random.default_rng(0)
    for caption in [*CAPTIONS[:40], "Zebra ✓ 東京 circles, SQUARES!", "  leading  and  doubled  spaces "]:
        assert text._merged_ids(caption, 0.0, rng) == text.ids(caption)


def test_bpe_dropout_is_a_function_of_seed_epoch_and_key(tok):
    text = TextTokenizer(tok, text_len=64)
    caption = "a small green square on the top a large blue circle on the left"

    def draw(seed, epoch, key):
        return tuple(text.encode(caption, 0.3, caption_rng(seed, epoch, key)))

    assert draw(0, 1, "000010001") == draw(0, 1, "000010001")
    assert len({draw(0, e, "000010001") for e in range(8)}) > 1
    assert len({draw(0, 1, f"0000100{k:02d}") for k in range(8)}) > 1
    assert len({draw(s, 1, "000010001") for s in range(8)}) > 1
    with pytest.raises(ValueError, match="generator"):
        text.encode(caption, 0.3)


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
