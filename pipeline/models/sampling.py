"""Autoregressive sampling of image tokens from the DALL·E transformer, with a per-layer key/value cache.

Given the text (and optionally the first image tokens, for image completion), image tokens are drawn one at a
time in raster order. With the cache, the known prefix runs through the model once and every new token costs one
position through the cached layers; without it, every step reruns the whole sequence with the unknown tokens set
to 0, which is valid because no position attends to a later one. Both paths draw from the generator identically,
so for a fixed seed they return the same tokens (up to floating-point near-ties).
"""

from __future__ import annotations

import torch

from pipeline.models.transformer import Dalle


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """`logits` [..., V] with everything outside the top `top_k` and then outside the nucleus `top_p` (the
    smallest set of most probable tokens whose probability mass reaches `top_p`) set to -inf. The most probable
    token always survives, so the result can always be sampled from."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    out = logits
    if top_k is not None and top_k < logits.shape[-1]:
        # Scatter the top-k indices rather than threshold at the k-th value, so ties cannot keep more than k.
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        out = out.masked_fill(~keep, float("-inf"))
    # top_p == 1 keeps everything; skipping it avoids dropping tokens to cumsum rounding just below 1.
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        # A token is needed while the mass of the tokens ranked above it is still short of top_p; the first
        # token has nothing above it, so it is always kept.
        mass_before = probs.cumsum(dim=-1) - probs
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        out = out.masked_fill(~keep, float("-inf"))
    return out


def _draw(
    logits: torch.Tensor, generator: torch.Generator | None, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    # float32 whatever the model's dtype: a bf16 softmax over thousands of codes loses the small probabilities.
    # Temperature first, so the nucleus is taken on the distribution actually sampled from.
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_image_tokens(
    model: Dalle,
    text: torch.Tensor,
    *,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prefix: torch.Tensor | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Image tokens [B, N] for raw text ids `text` [B, T] (0 = padding), sampled one at a time in raster order.

    `prefix` [B, P] fixes the first P image tokens (image completion) and is returned unchanged in front of the
    sampled rest. `use_cache=False` recomputes the whole sequence every step (slow; a reference for the cache).
    The model runs in eval mode (its previous mode is restored afterwards) in its parameters' dtype; `generator`
    must live on the model's device.
    """
    cfg = model.cfg
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if text.ndim != 2 or text.shape[1] != cfg.text_len:
        raise ValueError(f"text must be [B, {cfg.text_len}], got {list(text.shape)}")
    device = model.image_head.weight.device
    batch, t, n = text.shape[0], cfg.text_len, cfg.image_len
    text = text.to(device)
    image = torch.zeros(batch, n, dtype=torch.long, device=device)
    p = 0
    if prefix is not None:
        if prefix.ndim != 2 or prefix.shape[0] != batch or prefix.shape[1] > n:
            raise ValueError(f"prefix must be [{batch}, P <= {n}], got {list(prefix.shape)}")
        p = prefix.shape[1]
        image[:, :p] = prefix.to(device)
    if p == n:
        return image

    was_training = model.training
    model.eval()
    try:
        if use_cache:
            caches = model.new_caches(batch)
            # Text and given image tokens in one pass; the last of them predicts image token p.
            h = model.forward_cached(text, image, 0, t + p, caches)
            logits = model.head_logits(h[:, -1], t + p - 1)
            for j in range(p, n):
                image[:, j] = _draw(logits, generator, temperature, top_k, top_p)
                if j + 1 < n:
                    h = model.forward_cached(text, image, t + j, t + j + 1, caches)
                    logits = model.head_logits(h[:, -1], t + j)
        else:
            for j in range(p, n):
                # Tokens j.. are still 0 here, which no output at or before position t + j - 1 can see.
                _, image_logits = model(text, image)
                image[:, j] = _draw(image_logits[:, j], generator, temperature, top_k, top_p)
    finally:
        model.train(was_training)
    return image
