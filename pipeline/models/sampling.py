"""Autoregressive sampling of image tokens from the DALL·E transformer, with a per-layer key/value cache.

Given the text (and optionally the first image tokens, for image completion), image tokens are drawn one at a
time in raster order. With the cache, the known prefix runs through the model once and every new token costs one
position through the cached layers; without it, every step reruns the whole sequence with the unknown tokens set
to 0, which is valid because no position attends to a later one.

Each candidate (row) draws from its own generator, seeded by the caller (Gumbel-max: the argmax of the filtered
logits plus the row's Gumbel noise, a draw from the same distribution as a multinomial), so a candidate's tokens
depend on its seed only, never on the batch it is drawn in: the batch size is free to follow the device's memory
(`kv_batch_size`). Both paths draw identically, so for fixed seeds they return the same tokens (up to
floating-point near-ties).

Classifier-free guidance (`guidance` s, dalle-mini's "super conditioning", DALLE-pytorch's `cond_scale`): every
candidate also runs as an unconditional stream, the same image tokens after the empty (all-padding) caption, in
the same batch and through the same KV-cache path, and draws from `uncond + s * (cond - uncond)`. The model must
have been trained with a share of empty captions (`transformer.train.null_caption_prob`) for the unconditional
stream to mean anything; s = 1 draws what unguided sampling draws.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class CandidateNoise:
    """Gumbel noise [B, V] for each step, row r drawn from a generator seeded `seeds[r]`, `block` steps at a
    time (one small draw per row and block, not per step)."""

    def __init__(self, seeds: Sequence[int], vocab: int, device: torch.device, block: int = 64):
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        self.vocab, self.device, self.block = vocab, device, block
        self._buffer: torch.Tensor | None = None
        self._next = 0

    def gumbel(self) -> torch.Tensor:
        """The next step's noise [B, V] (float32)."""
        if self._buffer is None or self._next == self.block:
            shape = (self.block, self.vocab)
            rows = [torch.rand(shape, generator=g, device=self.device) for g in self.generators]
            self._buffer = -torch.log(-torch.log(torch.stack(rows, dim=1).clamp_min_(1e-20)))
            self._next = 0
        self._next += 1
        return self._buffer[self._next - 1]


def guided_logits(logits: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """float32 logits [B, V] to draw from: `logits` itself without guidance, else `logits` holds the B
    conditional rows and then their B unconditional rows, combined as `uncond + guidance * (cond - uncond)`."""
    # float32 whatever the model's dtype: a bf16 softmax over thousands of codes loses the small probabilities.
    logits = logits.float()
    if guidance is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + guidance * (cond - uncond)


def _draw(logits: torch.Tensor, noise: CandidateNoise, temperature: float, top_k: int | None, top_p: float | None):
    # Temperature first, so the nucleus is taken on the distribution actually sampled from.
    scaled = filter_logits(logits / temperature, top_k, top_p)
    return (scaled + noise.gumbel()).argmax(dim=-1)


def kv_cache_bytes(cfg, dtype: torch.dtype) -> int:
    """Bytes of one stream's key/value cache over every layer and the whole sequence (a guided candidate runs
    two streams)."""
    return 2 * cfg.layers * cfg.seq_len * cfg.d_model * torch.empty((), dtype=dtype).element_size()


def kv_batch_size(cfg, dtype: torch.dtype, free_bytes: int, *, fraction: float = 0.8, limit: int = 512) -> int:
    """Candidates that fit in `fraction` of `free_bytes` (after the weights are loaded): each needs its KV
    cache, a block of float32 noise and its step activations. At least 1, at most `limit`."""
    per = kv_cache_bytes(cfg, dtype) + 4 * 64 * cfg.image_vocab + 4 * 16 * cfg.d_model * cfg.mlp_ratio
    return max(1, min(limit, int(free_bytes * fraction) // per))


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the CUDA allocator's view on a GPU, the host's available memory on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


@torch.no_grad()
def sample_image_tokens(
    model: Dalle,
    text: torch.Tensor,
    *,
    seeds: Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    prefix: torch.Tensor | None = None,
    use_cache: bool = True,
    guidance: float | None = None,
) -> torch.Tensor:
    """Image tokens [B, N] for raw text ids `text` [B, T] (0 = padding), sampled one at a time in raster order.

    `prefix` [B, P] fixes the first P image tokens (image completion) and is returned unchanged in front of the
    sampled rest. `seeds` [B]: each row's generator seed. `use_cache=False` recomputes the whole sequence every
    step (slow; a reference for the cache). `guidance`: the classifier-free guidance scale (see the module
    docstring); None runs no unconditional stream. The model runs in eval mode (its previous mode is restored
    afterwards) in its parameters' dtype.
    """
    cfg = model.cfg
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if guidance is not None and guidance < 0:
        raise ValueError(f"guidance must be at least 0, got {guidance}")
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
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} candidates")
    noise = CandidateNoise(seeds, cfg.image_vocab, device)
    if guidance is not None:
        # the unconditional streams: the same image tokens after the empty caption, in the same batch
        text, image = torch.cat([text, torch.zeros_like(text)]), image.repeat(2, 1)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        token = _draw(guided_logits(logits, guidance), noise, temperature, top_k, top_p)
        return token if guidance is None else token.repeat(2)

    was_training = model.training
    model.eval()
    try:
        if use_cache:
            caches = model.new_caches(len(text))
            # Text and given image tokens in one pass; the last of them predicts image token p.
            h = model.forward_cached(text, image, 0, t + p, caches)
            logits = model.head_logits(h[:, -1], t + p - 1)
            for j in range(p, n):
                image[:, j] = draw(logits)
                if j + 1 < n:
                    h = model.forward_cached(text, image, t + j, t + j + 1, caches)
                    logits = model.head_logits(h[:, -1], t + j)
        else:
            for j in range(p, n):
                # Tokens j.. are still 0 here, which no output at or before position t + j - 1 can see.
                _, image_logits = model(text, image)
                image[:, j] = draw(image_logits[:, j])
    finally:
        model.train(was_training)
    return image[:batch]
