"""Sparse attention masks against a brute-force reference, the layer schedule, block masks, and the sdpa and flex
backends of SelfAttention against each other and against a hand-written masked softmax."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from pipeline.models.attention import (
    KINDS,
    SelfAttention,
    block_mask,
    dense_mask,
    layer_kinds,
    mask_mod,
    mean_visible_keys,
)

# (text_len, grid, kernel); the last has L = 272 > 128, so FlexAttention sees several blocks, some full.
GEOMETRIES = [(6, 5, 3), (4, 8, 11), (16, 16, 5)]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_compile_warning = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference_mask(kind: str, text_len: int, grid: int, kernel: int) -> torch.Tensor:
    """Straight from the definitions, one (query, key) pair at a time."""
    length = text_len + grid * grid
    mask = torch.zeros(length, length, dtype=torch.bool)
    for q in range(length):
        for k in range(q + 1):
            if k < text_len:
                mask[q, k] = True
                continue
            if q < text_len:
                continue
            qi, ki = q - text_len, k - text_len
            col_q, col_k = qi % grid, ki % grid
            if kind == "row":
                visible = ki in range(qi - grid, qi + 1)
            elif kind == "column":
                visible = col_k == col_q
            elif kind == "conv":  # kernel x kernel in raster order, wrapping around rows (Fig. 11d)
                r = kernel // 2
                visible = any(ki == qi - dr * grid + dc for dr in range(r + 1) for dc in range(-r, r + 1))
            else:
                visible = True
            mask[q, k] = visible
    return mask


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_text_rules_and_no_future(kind, geometry):
    text_len, grid, kernel = geometry
    mask = dense_mask(kind, text_len, grid, kernel)
    length = text_len + grid * grid
    assert mask.shape == (length, length) and mask.dtype == torch.bool
    assert not mask.triu(diagonal=1).any(), "a query sees a later key"
    assert mask.diagonal().all(), "a query does not see its own token"
    assert mask[text_len:, :text_len].all(), "an image query misses some text"
    assert torch.equal(mask[:text_len, :text_len], torch.ones(text_len, text_len, dtype=torch.bool).tril())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_masks_equal_brute_force(kind, geometry):
    assert torch.equal(dense_mask(kind, *geometry), reference_mask(kind, *geometry))


def test_row_window_reaches_the_token_above_the_prediction():
    text_len, grid = 3, 6
    mask = dense_mask("row", text_len, grid, 11)
    for qi in range(grid - 1, grid * grid - 1):
        above_next = qi + 1 - grid
        assert mask[text_len + qi, text_len + above_next]
        # and nothing further back in the image
        assert not mask[text_len + qi, text_len : text_len + max(qi - grid, 0)].any()


def test_conv_window_wraps_around_rows_like_the_paper():
    """Fig. 11d of the paper: the causal convolutional window is laid out in raster order, so at the
    image's edges it continues on the neighbouring row, as the row mask does, instead of stopping."""
    text_len, grid, kernel = 2, 8, 3

    def at(row: int, col: int) -> int:
        return text_len + row * grid + col

    mask = dense_mask("conv", text_len, grid, kernel)
    # query (2, 0) in the first column: one step back is (1, 7), one row up and one left wraps to (0, 7)
    visible = {(r, c) for r in range(grid) for c in range(grid) if mask[at(2, 0), at(r, c)]}
    assert visible == {(2, 0), (1, 7), (1, 0), (1, 1), (0, 7)}
    # query (1, 7) in the last column: one row up and one right wraps to (1, 0)
    visible = {(r, c) for r in range(grid) for c in range(grid) if mask[at(1, 7), at(r, c)]}
    assert visible == {(1, 7), (1, 6), (0, 7), (0, 6), (1, 0)}
    # away from the top every query sees kernel//2 rows of kernel keys and kernel//2 + 1 on its own row
    assert mask[text_len:, text_len:].sum(1)[4 * grid + 3] == (kernel // 2) * kernel + kernel // 2 + 1


def test_mask_mod_under_vmap_equals_dense():
    text_len, grid, kernel = 6, 5, 3
    length = text_len + grid * grid
    for kind in KINDS:
        vmapped = create_mask(mask_mod(kind, text_len, grid, kernel), None, None, length, length, device="cpu")
        assert torch.equal(vmapped[0, 0], dense_mask(kind, text_len, grid, kernel))


def test_unknown_kind_and_backend():
    with pytest.raises(ValueError, match="diagonal"):
        mask_mod("diagonal", 4, 4)
    with pytest.raises(ValueError, match="triton"):
        SelfAttention(16, 2, "triton")


def test_dense_mask_is_cached_per_device_string():
    assert dense_mask("row", 6, 5, 3) is dense_mask("row", 6, 5, 3, device=torch.device("cpu"))
    assert dense_mask("row", 6, 5, 3) is not dense_mask("row", 6, 5, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_block_mask_covers_dense_mask_tightly(kind):
    text_len, grid, kernel = 64, 24, 5  # L = 640: five 128-blocks per side
    dense = dense_mask(kind, text_len, grid, kernel)
    blocks = block_mask(kind, text_len, grid, kernel, "cpu")
    assert blocks is block_mask(kind, text_len, grid, kernel, torch.device("cpu"))
    q_block, kv_block = blocks.BLOCK_SIZE
    per_block = blocks.to_dense()[0, 0].bool()
    length = dense.shape[0]
    up = per_block.repeat_interleave(q_block, 0).repeat_interleave(kv_block, 1)[:length, :length]
    assert not (dense & ~up).any(), "a visible key lies in a skipped block"
    for i in range(per_block.shape[0]):
        for j in range(per_block.shape[1]):
            tile = dense[i * q_block : (i + 1) * q_block, j * kv_block : (j + 1) * kv_block]
            assert bool(per_block[i, j]) == bool(tile.any()), f"block ({i}, {j}) kept but empty, or the reverse"


def test_layer_kinds():
    kinds = layer_kinds(64)
    assert len(kinds) == 64 and kinds[-1] == "conv"
    columns = [i + 1 for i, kind in enumerate(kinds) if kind == "column"]
    assert columns == list(range(2, 63, 4))
    assert all(kind == "row" for i, kind in enumerate(kinds[:-1], start=1) if i not in columns)
    assert layer_kinds(4) == ["row", "column", "row", "conv"]
    assert layer_kinds(1) == ["conv"]
    with pytest.raises(ValueError):
        layer_kinds(0)


def test_mean_visible_keys():
    text_len, grid = 6, 5
    length = text_len + grid * grid
    assert mean_visible_keys("causal", text_len, grid, 3) == pytest.approx((length + 1) / 2)
    for kind in ("row", "column", "conv"):
        expected = reference_mask(kind, text_len, grid, 3).sum().item() / length
        assert mean_visible_keys(kind, text_len, grid, 3) == pytest.approx(expected)


def manual_attention(attn: SelfAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    batch, length, d_model = x.shape
    q, k, v = attn.qkv(x).view(batch, length, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return attn.out((probs @ v).transpose(1, 2).reshape(batch, length, d_model))


def _pair(backend_a: str, backend_b: str, seed: int = 0) -> tuple[SelfAttention, SelfAttention]:
    torch.manual_seed(seed)
    a = SelfAttention(32, 4, backend_a)
    b = SelfAttention(32, 4, backend_b)
    b.load_state_dict(a.state_dict())
    return a, b


def _grads(attn: SelfAttention, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    weights = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(1), device=out.device)
    return torch.autograd.grad((out * weights).sum(), [x, *attn.parameters()])


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_equals_manual_softmax_with_gradients(kind):
    text_len, grid, kernel = 6, 5, 3
    attn, _ = _pair("sdpa", "sdpa")
    x = torch.randn(2, text_len + grid * grid, 32, requires_grad=True)
    out = attn(x, kind, text_len, grid, kernel)
    ref = manual_attention(attn, x, reference_mask(kind, text_len, grid, kernel))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(_grads(attn, x, out), _grads(attn, x, ref)):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


@no_compile_warning
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_flex_equals_sdpa_forward(kind, geometry):
    # Eager flex has no backward on CPU; gradients are compared on CUDA below.
    text_len, grid, kernel = geometry
    sdpa, flex = _pair("sdpa", "flex")
    x = torch.randn(2, text_len + grid * grid, 32)
    with torch.no_grad():
        torch.testing.assert_close(flex(x, kind, *geometry), sdpa(x, kind, *geometry), atol=1e-5, rtol=1e-5)


def test_auto_backend_trains_on_cpu():
    attn = SelfAttention(32, 4, "auto")
    x = torch.randn(1, 6 + 25, 32, requires_grad=True)
    attn(x, "row", 6, 5, 3).sum().backward()  # would raise if "auto" picked flex on CPU
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_flex_equals_sdpa_with_gradients_on_cuda(kind):
    text_len, grid, kernel = 16, 16, 5
    sdpa, flex = (m.cuda() for m in _pair("sdpa", "flex"))
    x = torch.randn(2, text_len + grid * grid, 32, device="cuda", requires_grad=True)
    out_sdpa, out_flex = sdpa(x, kind, text_len, grid, kernel), flex(x, kind, text_len, grid, kernel)
    torch.testing.assert_close(out_flex, out_sdpa, atol=1e-4, rtol=1e-4)
    for g_flex, g_sdpa in zip(_grads(flex, x, out_flex), _grads(sdpa, x, out_sdpa)):
        torch.testing.assert_close(g_flex, g_sdpa, atol=1e-4, rtol=1e-3)
