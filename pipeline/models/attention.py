"""Sparse self-attention of the DALL·E transformer (Ramesh et al. 2021): the masks and the attention layer.

The sequence is `text_len` text tokens followed by `grid * grid` image tokens in raster order. Text is causal and
every image token sees all the text; image-to-image attention depends on the layer's kind ("row", "column",
"conv", or dense "causal"). Each mask is defined once, by `mask_mod`, a function of tensor indices only; the dense
boolean mask (for `scaled_dot_product_attention`) and FlexAttention's block mask are both evaluated from it, so the
two backends cannot drift apart.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

log = logging.getLogger(__name__)

KINDS = ("row", "column", "conv", "causal")
BACKENDS = ("auto", "flex", "sdpa")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def layer_kinds(layers: int) -> list[str]:
    """The paper's schedule: column attention at layers 2, 6, 10, ... (1-based), row elsewhere, conv last."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, layers)]
    return [*kinds, "conv"]


def mask_mod(kind: str, text_len: int, grid: int, kernel: int = 11) -> MaskMod:
    """`(b, h, q_idx, kv_idx) -> bool` for one layer kind; True means the query may attend to the key.

    Only tensor ops, no data-dependent Python branches, so FlexAttention can vmap it and `dense_mask` can
    broadcast it over a whole [L, L] grid.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose from {', '.join(KINDS)}")
    radius = kernel // 2

    def near(qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
        # Only consulted where kv_idx <= q_idx and both are image positions, so ki <= qi holds here.
        if kind == "row":
            # `grid` keys back in raster order reach the token directly above the one this query predicts.
            return qi - ki <= grid
        if kind == "column":
            return (qi - ki) % grid == 0
        if kind == "conv":
            # The paper's causal convolutional mask (Ramesh et al. 2021, appendix B.1, Fig. 11d): a
            # kernel x kernel window over the rows at and above the query, with wraparound like the row
            # mask. The window is laid out in raster order: key = query - dr * grid + dc for a row offset
            # dr in [0, radius] and a column offset dc in [-radius, radius], so near the image's left and
            # right edges it continues on the neighbouring row instead of stopping at the edge. The row
            # offset tried is the nearest whole number of rows back, clamped to the window.
            back = qi - ki
            rows = torch.div(back + grid // 2, grid, rounding_mode="floor").clamp(0, radius)
            return (back - rows * grid).abs() <= radius
        return ki <= qi

    def mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        is_text_key = kv_idx < text_len
        return (kv_idx <= q_idx) & (is_text_key | near(q_idx - text_len, kv_idx - text_len))

    return mod


@functools.lru_cache(maxsize=64)
def _dense_mask(kind: str, text_len: int, grid: int, kernel: int, device: str) -> torch.Tensor:
    length = text_len + grid * grid
    pos = torch.arange(length, device=device)
    return mask_mod(kind, text_len, grid, kernel)(None, None, pos[:, None], pos[None, :])


def dense_mask(
    kind: str, text_len: int, grid: int, kernel: int = 11, device: torch.device | str | None = None
) -> torch.Tensor:
    """BoolTensor [L, L] (query, key) of `mask_mod`, cached per arguments; shared, so never modify it in place."""
    return _dense_mask(kind, text_len, grid, kernel, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=64)
def _block_mask(kind: str, text_len: int, grid: int, kernel: int, device: str) -> BlockMask:
    length = text_len + grid * grid
    log.debug("building the %s block mask for L=%d on %s", kind, length, device)
    return create_block_mask(
        mask_mod(kind, text_len, grid, kernel), B=None, H=None, Q_LEN=length, KV_LEN=length, device=device
    )


def block_mask(kind: str, text_len: int, grid: int, kernel: int, device: torch.device | str) -> BlockMask:
    """FlexAttention's block-sparse form of `mask_mod`, built once per arguments (building scans the whole mask)."""
    return _block_mask(kind, text_len, grid, kernel, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def mean_visible_keys(kind: str, text_len: int, grid: int, kernel: int = 11) -> float:
    """Mean number of keys each of the L queries attends to (for FLOP accounting)."""
    mask = dense_mask(kind, text_len, grid, kernel)
    return mask.sum().item() / mask.shape[0]


_compiled_flex: Callable[..., torch.Tensor] | None = None


def _flex_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    # Eager flex materialises the whole score matrix, fine for CPU tests; on CUDA only the compiled kernel is
    # block-sparse. Compiled lazily so importing this module never starts the compiler.
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        log.info("compiling flex_attention")
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


class SelfAttention(nn.Module):
    """Multi-head self-attention over the text+image sequence with a per-call sparse mask kind.

    Backends: "sdpa" (dense boolean mask), "flex" (FlexAttention block mask; compiled on CUDA), "auto" (flex on
    CUDA, sdpa elsewhere, since eager flex on CPU has no backward).
    """

    def __init__(self, d_model: int, heads: int, backend: str = "auto") -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.heads = heads
        self.head_dim = d_model // heads
        self.backend = backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def resolved_backend(self, device: torch.device) -> str:
        """ "flex" or "sdpa": what this layer runs on `device`."""
        if self.backend == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return self.backend

    def mask(self, kind: str, text_len: int, grid: int, kernel: int, device: torch.device) -> torch.Tensor | BlockMask:
        """The cached mask `forward` uses on `device`: a block mask for flex, a dense one for SDPA."""
        if self.resolved_backend(device) == "flex":
            return block_mask(kind, text_len, grid, kernel, device)
        return dense_mask(kind, text_len, grid, kernel, device)

    def forward(
        self,
        x: torch.Tensor,
        kind: str,
        text_len: int,
        grid: int,
        kernel: int = 11,
        mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        """`mask`, when given, is `self.mask(...)` looked up by the caller: a compiled block then
        takes it as an input instead of tracing the lookup (and rebuilding the mask) every call."""
        batch, length, d_model = x.shape
        if length != text_len + grid * grid:
            raise ValueError(f"sequence length {length} != text_len {text_len} + grid {grid}**2")
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if mask is None:
            mask = self.mask(kind, text_len, grid, kernel, x.device)
        if isinstance(mask, BlockMask):
            y = _flex_fn(x.device)(q, k, v, block_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, length, d_model))

    def forward_cached(
        self,
        x_new: torch.Tensor,
        cache: KVCache,
        start: int,
        kind: str,
        text_len: int,
        grid: int,
        kernel: int = 11,
    ) -> torch.Tensor:
        """Attention output for positions [start, start + n) of `x_new` ([B, n, d_model]) given `cache` holding this
        layer's keys/values for [0, start); stores the new keys/values in `cache`.

        The mask is the rows [start, start + n) and columns [0, start + n) of the same `dense_mask` the full forward
        uses, so every sparse layer kind behaves exactly as in training. Always SDPA: decoding a few queries against
        a dense key slice is cheap, and a block mask would not line up with arbitrary `start`s.
        """
        batch, n, d_model = x_new.shape
        end = start + n
        length = text_len + grid * grid
        # Appending only: a gap or an overwrite would silently attend to stale or zero keys.
        if start != cache.length:
            raise ValueError(f"cache holds positions [0, {cache.length}) but the new span starts at {start}")
        if n < 1 or end > length or end > cache.k.shape[2]:
            raise ValueError(f"span [{start}, {end}) does not fit a sequence of length {length}")
        q, k, v = self.qkv(x_new).view(batch, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        cache.k[:, :, start:end] = k
        cache.v[:, :, start:end] = v
        cache.length = end
        mask = dense_mask(kind, text_len, grid, kernel, x_new.device)[start:end, :end]
        y = F.scaled_dot_product_attention(q, cache.k[:, :, :end], cache.v[:, :, :end], attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(batch, n, d_model))


class KVCache:
    """Keys and values of one attention layer for positions [0, length), preallocated to the whole sequence so
    decoding appends in place instead of re-concatenating an ever longer tensor every step."""

    def __init__(
        self, batch: int, heads: int, head_dim: int, seq_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        self.k = torch.zeros(batch, heads, seq_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0
