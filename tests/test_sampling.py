"""KV-cache sampling of the DALL·E transformer: cached decoding reproduces the full forward's logits position by
position for every attention kind, cached and recomputing samplers draw the same tokens for a seed, image
completion keeps its prefix, the cache never reruns the prefix, and top-k / nucleus filtering."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import transformer
from pipeline.models.attention import KINDS
from pipeline.models.sampling import (
    CandidateNoise,
    _draw,
    filter_logits,
    guided_logits,
    kv_batch_size,
    kv_cache_bytes,
    sample_image_tokens,
)
from pipeline.models.transformer import Dalle, DalleConfig

TINY = DalleConfig(
    layers=4, heads=2, head_dim=8, text_len=6, text_vocab=20, image_grid=4, image_vocab=16, conv_kernel=3
)
# "default" is the paper's schedule (row, column, row, conv); the others give every layer the same kind.
SCHEDULES = ("default", *KINDS)


def make_model(schedule: str, monkeypatch: pytest.MonkeyPatch, layers: int = 4) -> Dalle:
    if schedule != "default":
        monkeypatch.setattr(transformer, "layer_kinds", lambda n: [schedule] * n)
    torch.manual_seed(0)
    cfg = DalleConfig(**{**TINY.to_dict(), "layers": layers})
    # float64 so cached and recomputed logits agree to ~1e-12 and sampled tokens cannot differ by rounding.
    m = Dalle(cfg).double().eval()
    # The init makes logits nearly uniform; larger weights make the attention pattern (and the mask) matter.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim > 1:
                p.mul_(20)
    if schedule != "default":
        assert [b.kind for b in m.blocks] == [schedule] * layers
    return m


def seeds(first: int, batch: int = 3) -> list[int]:
    return list(range(first, first + batch))


def make_text(batch: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, TINY.text_vocab, (batch, TINY.text_len), generator=gen)
    text[:, TINY.text_len // 2 :] = 0  # padded tails
    text[0, -1] = 3  # a token after padding
    return text


@pytest.mark.parametrize(("schedule", "prefix_len"), [(s, 0) for s in SCHEDULES] + [("default", 5)])
def test_cached_logits_equal_the_full_forward_at_every_position(schedule, prefix_len, monkeypatch):
    m = make_model(schedule, monkeypatch)
    text = make_text()
    image = torch.randint(0, TINY.image_vocab, (3, TINY.image_len), generator=torch.Generator().manual_seed(2))
    full_text, full_image = m(text, image)
    t, length = TINY.text_len, TINY.seq_len
    caches = m.new_caches(3)
    # One pass over the text (and prefix), then one position at a time, as the sampler does.
    first = t + prefix_len
    with torch.no_grad():
        h = m.forward_cached(text, image, 0, first, caches)
        spans = [(pos, h[:, pos]) for pos in range(first)]
        for pos in range(first, length - 1):
            spans.append((pos, m.forward_cached(text, image, pos, pos + 1, caches)[:, 0]))
    assert all(c.length == length - 1 for c in caches)
    for pos, hidden in spans:
        got = m.head_logits(hidden, pos)
        want = full_text[:, pos] if pos < t - 1 else full_image[:, pos - (t - 1)]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"position {pos}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("filters", [{}, {"top_k": 6, "top_p": 0.9, "temperature": 0.7}])
def test_cached_sampling_equals_full_recomputation(schedule, filters, monkeypatch):
    m = make_model(schedule, monkeypatch)
    text = make_text()
    cached = sample_image_tokens(m, text, seeds=seeds(7), **filters)
    full = sample_image_tokens(m, text, seeds=seeds(7), use_cache=False, **filters)
    assert cached.shape == (3, TINY.image_len) and cached.dtype == torch.long
    assert torch.equal(cached, full)
    # The rows differ (different texts and draws), so the test is not passing on a degenerate constant output.
    assert not torch.equal(cached[0], cached[1])


@pytest.mark.parametrize("kind", KINDS)
def test_one_layer_models_per_kind(kind, monkeypatch):
    m = make_model(kind, monkeypatch, layers=1)
    text = make_text()
    cached = sample_image_tokens(m, text, seeds=seeds(3), top_k=8)
    full = sample_image_tokens(m, text, seeds=seeds(3), top_k=8, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("rows", [1, 2])
def test_image_completion_keeps_the_prefix(rows, monkeypatch):
    m = make_model("default", monkeypatch)
    text = make_text()
    prefix = torch.randint(0, TINY.image_vocab, (3, rows * TINY.image_grid), generator=torch.Generator().manual_seed(5))
    cached = sample_image_tokens(m, text, seeds=seeds(9), prefix=prefix, top_p=0.95)
    full = sample_image_tokens(m, text, seeds=seeds(9), prefix=prefix, top_p=0.95, use_cache=False)
    assert torch.equal(cached[:, : prefix.shape[1]], prefix)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_cached_path_runs_one_new_position_per_step(guidance, monkeypatch):
    m = make_model("default", monkeypatch)
    prefix_len = TINY.image_grid
    lengths: list[list[int]] = [[] for _ in m.blocks]
    rows: set[int] = set()
    for i, block in enumerate(m.blocks):
        original = block.forward_cached

        def counting(x, cache, start, _i=i, _original=original):
            lengths[_i].append(x.shape[1])
            rows.add(x.shape[0])
            return _original(x, cache, start)

        monkeypatch.setattr(block, "forward_cached", counting)
        # The full (uncached) block forward must never run on the cached path.
        block.register_forward_pre_hook(lambda *_: pytest.fail("full block forward called"))
    prefix = torch.zeros(3, prefix_len, dtype=torch.long)
    sample_image_tokens(m, make_text(), seeds=seeds(0), prefix=prefix, guidance=guidance)
    # The prefix once, then one position for each sampled token but the last (which feeds nothing).
    steps = TINY.image_len - prefix_len - 1
    assert all(seen == [TINY.text_len + prefix_len] + [1] * steps for seen in lengths)
    # guided: the unconditional streams ride in the same batch through the same cache
    assert rows == {3 if guidance is None else 6}


def test_full_prefix_is_returned_unchanged(monkeypatch):
    m = make_model("default", monkeypatch)
    prefix = torch.randint(0, TINY.image_vocab, (3, TINY.image_len), generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_image_tokens(m, make_text(), seeds=seeds(0), prefix=prefix), prefix)


def test_sampling_restores_training_mode(monkeypatch):
    m = make_model("default", monkeypatch).train()
    sample_image_tokens(m, make_text(), seeds=seeds(0))
    assert m.training


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits, top_k=7)
    kept = out.isfinite()
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(out[kept], logits[kept])
    assert (logits[kept].view(4, 7).min(-1).values >= logits.masked_fill(kept, -1e9).max(-1).values).all()
    assert torch.equal(filter_logits(logits, top_k=100), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()
    # 0.5 + 0.3 = 0.8 reaches 0.8 (within float error either side), 0.5 alone does not.
    assert filter_logits(logits, top_p=0.79).isfinite().tolist() == [[True, False, True, False], [True] * 4]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[True, False, True, True], [True] * 4]
    assert filter_logits(logits, top_p=1.0).isfinite().all()
    # A random check against a brute-force definition.
    rand = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    for p in (0.1, 0.5, 0.9):
        kept = filter_logits(rand, top_p=p).isfinite()
        for row, keep in zip(rand.softmax(-1), kept, strict=True):
            ranked = row.sort(descending=True).values
            need = int((ranked.cumsum(0) < p).sum()) + 1
            assert int(keep.sum()) == need
            if not keep.all():
                assert row[keep].min() >= row[~keep].max()


def test_best_token_always_survives():
    logits = torch.tensor([[10.0, 0.0, -1.0], [0.0, 3.0, 2.9]])
    for out in (filter_logits(logits, top_p=1e-6), filter_logits(logits, top_k=1), filter_logits(logits, 1, 0.5)):
        assert out.isfinite().tolist() == [[True, False, False], [False, True, False]]
    out = filter_logits(logits, top_k=2, top_p=0.01)
    assert torch.equal(out.argmax(-1), logits.argmax(-1))
    with pytest.raises(ValueError):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError):
        filter_logits(logits, top_p=0.0)


def test_a_candidate_depends_on_its_seed_not_on_its_batch(monkeypatch):
    m = make_model("default", monkeypatch)
    text = make_text(batch=5)
    whole = sample_image_tokens(m, text, seeds=[11, 12, 13, 14, 15], top_k=8)
    parts = [
        sample_image_tokens(m, text[i : i + 2], seeds=[11 + i, 12 + i][: len(text[i : i + 2])], top_k=8)
        for i in (0, 2, 4)
    ]
    assert torch.equal(torch.cat(parts), whole)
    again = sample_image_tokens(m, text[[2, 0]], seeds=[13, 11], top_k=8)
    assert torch.equal(again, whole[[2, 0]])
    assert not torch.equal(sample_image_tokens(m, text[:1], seeds=[99], top_k=8), whole[:1])
    with pytest.raises(ValueError, match="2 seeds for 5 candidates"):
        sample_image_tokens(m, text, seeds=[1, 2])


def test_gumbel_max_draws_from_the_softmax():
    """The per-candidate noise gives the same distribution as multinomial sampling."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    noise = CandidateNoise([3], 5, torch.device("cpu"))
    counts = torch.bincount(torch.cat([_draw(logits, noise, 1.0, None, None) for _ in range(20_000)]), minlength=5)
    expected = logits.softmax(-1)[0] * 20_000
    assert counts[4] == 0
    assert ((counts.float() - expected).abs() <= 4 * expected.sqrt() + 1).all(), (counts, expected)
    assert _draw(logits, CandidateNoise([3], 5, torch.device("cpu")), 1.0, 1, None).item() == 0  # top-1: greedy


def test_the_batch_follows_the_kv_cache_memory():
    from pipeline.models.transformer import PRESETS, DalleConfig

    big = DalleConfig(**PRESETS["12b"], text_len=256, text_vocab=16384, image_grid=32, image_vocab=8192)
    per = kv_cache_bytes(big, torch.bfloat16)
    assert per / 1e9 == pytest.approx(2 * 64 * 1280 * 3968 * 2 / 1e9)  # ≈1.3 GB a candidate at 12B
    assert 80e9 / per < 64  # the old default batch of 64 cannot fit beside nothing on an 80 GB GPU
    free = 80e9 - 24.6e9  # an 80 GB GPU after the bf16 weights
    size = kv_batch_size(big, torch.bfloat16, int(free))
    assert 25 <= size <= 40 and size * per <= 0.8 * free
    assert kv_batch_size(big, torch.bfloat16, 10**6) == 1
    assert kv_batch_size(TINY, torch.float32, 10**12) == 512


def test_guided_logits_push_away_from_the_unconditional_stream():
    cond, uncond = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 0.5, -1.0]])
    both = torch.cat([cond, uncond])
    torch.testing.assert_close(guided_logits(both, 3.0), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(guided_logits(both, 1.0), cond)
    torch.testing.assert_close(guided_logits(both, 0.0), uncond)
    assert guided_logits(cond.bfloat16(), None).dtype == torch.float32


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_guidance_1_draws_what_unguided_sampling_draws(schedule, monkeypatch):
    """Both streams run (and are combined) at scale 1, and the draw is the unguided one token for token."""
    m = make_model(schedule, monkeypatch)
    text = make_text()
    unguided = sample_image_tokens(m, text, seeds=seeds(4), top_k=8)
    assert torch.equal(sample_image_tokens(m, text, seeds=seeds(4), top_k=8, guidance=1.0), unguided)
    guided = sample_image_tokens(m, text, seeds=seeds(4), top_k=8, guidance=3.0)
    assert not torch.equal(guided, unguided)
    # the cached guided path equals the recomputing one
    full = sample_image_tokens(m, text, seeds=seeds(4), top_k=8, guidance=3.0, use_cache=False)
    assert torch.equal(guided, full)


def test_the_unconditional_stream_sees_no_caption(monkeypatch):
    """Scale 0 draws from the unconditional stream alone: what the empty caption draws, whatever the
    caption; completion prefixes still reach it."""
    m = make_model("default", monkeypatch)
    text, empty = make_text(), torch.zeros(3, TINY.text_len, dtype=torch.long)
    alone = sample_image_tokens(m, text, seeds=seeds(2), guidance=0.0)
    assert torch.equal(alone, sample_image_tokens(m, empty, seeds=seeds(2)))
    assert torch.equal(alone, sample_image_tokens(m, make_text(seed=9), seeds=seeds(2), guidance=0.0))
    assert not torch.equal(alone, sample_image_tokens(m, text, seeds=seeds(2)))
    prefix = torch.randint(0, TINY.image_vocab, (3, TINY.image_grid), generator=torch.Generator().manual_seed(3))
    completed = sample_image_tokens(m, text, seeds=seeds(2), guidance=0.0, prefix=prefix)
    assert torch.equal(completed, sample_image_tokens(m, empty, seeds=seeds(2), prefix=prefix))
    with pytest.raises(ValueError, match="guidance must be at least 0"):
        sample_image_tokens(m, text, seeds=seeds(2), guidance=-1.0)
