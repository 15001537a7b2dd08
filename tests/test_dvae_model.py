"""dVAE model: bit-compatibility with OpenAI's `dall_e`, safe loading of its pickles, the loss maths, training."""

from __future__ import annotations

import math
import os

import dall_e  # installed by the Makefile; the compatibility test must not be skipped
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.models import DVAESection
from pipeline.models.dvae import (
    DVAE,
    DVAEConfig,
    kl_to_uniform,
    load_dvae,
    logit_laplace_nll,
    map_pixels,
    save_dvae,
    unmap_pixels,
)
from pipeline.models.dvae_openai import load_openai_dvae

SMALL = dict(image_size=32, vocab_size=64, n_hid=16, n_blk_per_group=1, group_count=3, n_init=16)


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    # dall_e initialises biases to zero, which would hide a bias mix-up.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if p.ndim == 1 else p.std().item()))
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Convolutions this small are dominated by OpenMP hand-offs; one thread is many times faster on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def openai(tmp_path_factory):
    """Small dall_e modules pickled exactly as OpenAI released theirs (`torch.save(module)`)."""
    tmp = tmp_path_factory.mktemp("openai")
    enc = _randomised(dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512), 1)
    dec = _randomised(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512), 2)
    torch.save(enc, tmp / "encoder.pkl")
    torch.save(dec, tmp / "decoder.pkl")
    return enc, dec, str(tmp / "encoder.pkl"), str(tmp / "decoder.pkl")


@pytest.fixture
def small():
    torch.manual_seed(0)
    return DVAE(DVAEConfig(**SMALL))


def _images(n: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_matches_dall_e_outputs(openai):
    enc, dec, enc_path, dec_path = openai
    model = load_openai_dvae(enc_path, dec_path)
    released = DVAEConfig(image_size=256, vocab_size=512, n_hid=64, n_blk_per_group=1, group_count=4, n_init=32)
    assert model.config == released
    x = map_pixels(_images(2, 64))
    tokens = torch.randint(0, 512, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    one_hot = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), enc(x))
        expected = dec(one_hot)
        torch.testing.assert_close(model.decoder(one_hot), expected)
        torch.testing.assert_close(model.decoder.forward_tokens(tokens), expected)
    assert model.decode(tokens.flatten(1)).shape == (2, 3, 64, 64)


def test_refuses_other_pickles(openai, tmp_path):
    _, _, enc_path, dec_path = openai
    linear = tmp_path / "linear.pkl"
    torch.save(nn.Linear(2, 2), linear)
    with pytest.raises(ValueError, match=f"^{linear}: .*torch.nn.modules.linear.Linear"):
        load_openai_dvae(str(linear), dec_path)
    with pytest.raises(ValueError, match=f"^{dec_path}: not a pickled dall_e.encoder.Encoder"):
        load_openai_dvae(dec_path, dec_path)
    with pytest.raises(ValueError, match=f"^{enc_path}: not a pickled dall_e.decoder.Decoder"):
        load_openai_dvae(enc_path, enc_path)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'nope.pkl'}: no such file"):
        load_openai_dvae(enc_path, str(tmp_path / "nope.pkl"))
    other = tmp_path / "decoder_1024.pkl"
    torch.save(dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=1024), other)
    with pytest.raises(ValueError, match=f"^{other}: vocab_size 1024 differs"):
        load_openai_dvae(enc_path, str(other))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_disallowed_globals_without_running_them(openai, tmp_path):
    _, _, _, dec_path = openai
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    torch.save({"blocks": _Evil(str(marker))}, evil)
    with pytest.raises(ValueError, match=f"^{evil}: .*refusing to load global (posix|os|nt).system"):
        load_openai_dvae(str(evil), dec_path)
    assert not marker.exists()


def test_map_unmap_pixels():
    x = _images()
    mapped = map_pixels(x)
    assert mapped.min() >= 0.1 and mapped.max() <= 0.9
    torch.testing.assert_close(unmap_pixels(mapped), x)
    assert unmap_pixels(torch.tensor([0.0, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("mu,log_b", [(0.3, -1.0), (-1.5, -0.5), (2.0, -2.0)])
def test_logit_laplace_is_a_density_with_mode_at_sigmoid_mu(mu, log_b):
    x = torch.linspace(1e-7, 1 - 1e-7, 400_001, dtype=torch.float64)
    nll = logit_laplace_nll(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(log_b, dtype=torch.float64))
    assert abs(torch.trapezoid(torch.exp(-nll), x).item() - 1) < 1e-2
    # For b < 1 the density in x peaks where logit(x) = mu.
    assert abs(x[nll.argmin()].item() - 1 / (1 + math.exp(-mu))) < 1e-4


def test_kl_to_uniform():
    assert torch.allclose(kl_to_uniform(torch.full((2, 64, 4, 4), 3.0)), torch.zeros(2), atol=1e-5)
    peaked = torch.zeros(2, 64, 4, 4)
    peaked[:, 7] = 60.0
    torch.testing.assert_close(kl_to_uniform(peaked), torch.full((2,), 16 * math.log(64)))


def test_forward_shapes_determinism_and_gradients(small):
    x = _images()
    out = small(x, temperature=1.0, kl_weight=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.isfinite(out.loss) and out.loss.ndim == 0
    assert out.logits.shape == (4, 64, 8, 8) and out.recon.shape == x.shape
    assert 0 <= out.recon.min() and out.recon.max() <= 1 and not out.recon.requires_grad
    again = small(x, temperature=1.0, kl_weight=1.0, generator=torch.Generator().manual_seed(5))
    assert out.loss.item() == again.loss.item()
    out.loss.backward()
    for part in (small.encoder, small.decoder):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters())
    assert small.encoder.blocks.input.weight.grad.abs().sum() > 0
    assert small.decoder.blocks.output.conv.weight.grad.abs().sum() > 0

    tokens = small.tokens(x)
    assert tokens.shape == (4, small.grid**2) == (4, 64) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < small.vocab_size
    images = small.decode(tokens)
    assert images.shape == x.shape and 0 <= images.min() and images.max() <= 1


def test_from_config_and_state_dict_names():
    model = DVAE(DVAESection(**SMALL).build(DVAEConfig))
    assert (model.grid, model.vocab_size, model.image_size) == (8, 64, 32)
    keys = set(model.state_dict())
    assert {"encoder.blocks.input.weight", "encoder.blocks.group_1.block_1.res_path.conv_1.weight"} <= keys
    assert {"encoder.blocks.output.conv.bias", "decoder.blocks.group_1.block_1.id_path.weight"} <= keys
    with pytest.raises(ValueError, match="not divisible"):
        DVAE(DVAEConfig(image_size=36, group_count=4))


def test_decode_by_indexing_equals_one_hot_decoder(small):
    tokens = torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(1))
    one_hot = F.one_hot(tokens.view(3, 8, 8), 64).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected = unmap_pixels(torch.sigmoid(small.decoder(one_hot)[:, :3]))
    torch.testing.assert_close(small.decode(tokens), expected)


def test_save_load_round_trip(small, tmp_path):
    url = str(tmp_path / "out" / "dvae.pt")
    save_dvae(small, url)
    loaded = load_dvae(url)
    assert loaded.config == small.config
    x = _images()
    assert torch.equal(loaded.tokens(x), small.tokens(x))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=f"^{other}: not a dVAE file"):
        load_dvae(str(other))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=f"^{garbage}: not a dVAE file"):
        load_dvae(str(garbage))


def test_training_reduces_loss(small):
    # Blocky images (4x4 colour cells) that an 8x8 token grid can represent.
    x = F.interpolate(_images(4, 4), scale_factor=8)
    opt = torch.optim.Adam(small.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        return small(x, temperature=1.0, kl_weight=0.1, generator=torch.Generator().manual_seed(0)).loss

    with torch.no_grad():
        before = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < before - 0.1, (before, after)


def test_bf16_autocast_close_to_fp32(small):
    x = _images()
    ref = small(x, temperature=1.0, kl_weight=1.0, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = small(x, temperature=1.0, kl_weight=1.0, generator=torch.Generator().manual_seed(2))
        tokens = small.tokens(x)
        images = small.decode(tokens)
    assert low.loss.dtype == torch.float32 and torch.isfinite(low.loss)
    assert abs(low.loss.item() - ref.loss.item()) < 0.05 * abs(ref.loss.item()) + 0.02
    assert (low.recon - ref.recon).abs().max() < 0.05
    assert images.dtype == torch.float32 and images.shape == x.shape


def test_short_run_options_straight_through_usage_and_mse(small):
    from pipeline.models.dvae import map_pixels, unmap_pixels, usage_entropy

    x = _images()
    base = dict(temperature=1.0, kl_weight=0.0)
    plain = small(x, **base, generator=torch.Generator().manual_seed(3))
    st = small(x, **base, generator=torch.Generator().manual_seed(3), straight_through=True)
    # straight-through: the decoder sees exactly the one-hot codes of the Gumbel sample's argmax ...
    u = torch.rand(st.logits.shape, generator=torch.Generator().manual_seed(3)).clamp(
        torch.finfo(torch.float32).tiny, 1 - torch.finfo(torch.float32).eps
    )
    hard = (st.logits - torch.log(-torch.log(u))).argmax(dim=1)
    with torch.no_grad():
        expected = unmap_pixels(torch.sigmoid(small.decoder.forward_tokens(hard)[:, :3]))
    torch.testing.assert_close(st.recon, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(st.recon, plain.recon)
    # without Gumbel noise the decoder sees the argmax codes the dVAE gives at encode time
    quiet = small(x, **base, generator=torch.Generator().manual_seed(3), straight_through=True, noise=0.0)
    with torch.no_grad():
        encoded = unmap_pixels(
            torch.sigmoid(small.decoder.forward_tokens(small.tokens(x).view(-1, *hard.shape[1:]))[:, :3])
        )
    torch.testing.assert_close(quiet.recon, encoded, rtol=1e-4, atol=1e-5)
    assert not torch.equal(hard, st.logits.argmax(dim=1))  # full noise: not the argmax codes
    # ... and the encoder still gets gradients through the relaxed sample
    small.zero_grad()
    st.loss.backward()
    assert small.encoder.blocks.input.weight.grad.abs().sum() > 0
    # usage entropy: 1 for a uniform mean distribution, 0 for a single code; subtracted with its weight
    assert usage_entropy(torch.zeros(2, 64, 4, 4)).item() == pytest.approx(1.0)
    one = torch.full((2, 64, 4, 4), -30.0)
    one[:, 5] = 30.0
    assert usage_entropy(one).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        u_out = small(x, **base, generator=torch.Generator().manual_seed(3), usage_weight=0.5)
        m_out = small(x, **base, generator=torch.Generator().manual_seed(3), mse_weight=30.0)
    assert u_out.loss.item() == pytest.approx(plain.loss.item() - 0.5 * usage_entropy(plain.logits).item(), rel=1e-5)
    mse = ((plain.recon - x) ** 2).mean().item()
    assert m_out.loss.item() == pytest.approx(plain.loss.item() + 30.0 * mse, rel=1e-5)
    assert map_pixels(x).shape == x.shape
