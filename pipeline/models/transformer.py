"""The DALL·E decoder-only transformer (Ramesh et al. 2021) over text and image tokens, with its config, presets and
analytic parameter/FLOP counts.

Sequence layout. A sample is `text` (LongTensor [B, T], T = text_len, id 0 = padding) and `image` (LongTensor
[B, N], N = grid * grid dVAE codes in raster order). Padding gets one learned token per text position: a 0 at
position p becomes id `text_vocab + p` (`text_ids`), in the inputs and in the text targets alike, so the text
embedding and the text head have `text_vocab + text_len` rows. The model reads

    s = [text'_0 .. text'_{T-1} | image_0 .. image_{N-1}]      (length L = T + N, e.g. 256 + 1024 = 1280)

and the output at position p predicts s[p + 1]: outputs 0..T-2 predict text' 1..T-1 (text head), outputs
T-1..T+N-2 predict image 0..N-1 (image head); the last output predicts nothing and is never projected. L stays
T + N (no start token) so FlexAttention's 128-blocks line up with the text/image boundary.

Embeddings: text token + learned text position; image token + row[r] + column[c] for image position (r, c).
Pre-LN blocks (attention kinds from `layer_kinds`, all over one softmax across text and image keys), a final
LayerNorm and two bias-free heads. The loss is float32 cross-entropy, `text_loss_weight * text +
image_loss_weight * image` (the paper's 1/8 and 7/8).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.attention import BACKENDS, KVCache, SelfAttention, layer_kinds, mean_visible_keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DalleConfig:
    """Size and vocabularies of the transformer; defaults are the paper's (256 BPE tokens, 32x32 dVAE codes)."""

    layers: int
    heads: int
    head_dim: int = 64
    mlp_ratio: int = 4
    text_len: int = 256
    text_vocab: int = 16384
    image_grid: int = 32
    image_vocab: int = 8192
    conv_kernel: int = 11
    text_loss_weight: float = 0.125
    image_loss_weight: float = 0.875
    attention: str = "auto"
    checkpoint_activations: bool = False

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "mlp_ratio", "text_vocab", "image_grid", "image_vocab"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        # Fewer than two text positions leaves no text token to predict.
        if self.text_len < 2:
            raise ValueError(f"text_len must be at least 2, got {self.text_len}")
        # An even kernel would silently act as the next odd one (the neighbourhood is +-kernel//2).
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd and positive, got {self.conv_kernel}")
        if self.text_loss_weight < 0 or self.image_loss_weight < 0:
            raise ValueError("loss weights must be non-negative")
        if self.attention not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose from {', '.join(BACKENDS)}")

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DalleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown DalleConfig key {key!r}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "demo": {"layers": 4, "heads": 4, "head_dim": 32},
    "small": {"layers": 12, "heads": 12, "head_dim": 64},
    "1.3b": {"layers": 24, "heads": 32, "head_dim": 64},
    "12b": {"layers": 64, "heads": 62, "head_dim": 64},
}


def preset(name: str, **overrides: Any) -> DalleConfig:
    """A preset's config with `overrides` applied (unknown keys raise ValueError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; choose from {', '.join(PRESETS)}")
    return DalleConfig.from_dict({**PRESETS[name], **overrides})


def _embedding_params(cfg: DalleConfig) -> int:
    text_rows = cfg.text_vocab + cfg.text_len
    return cfg.d_model * (text_rows + cfg.text_len + cfg.image_vocab + 2 * cfg.image_grid)


def _non_embedding_params(cfg: DalleConfig) -> int:
    d, hidden = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    attn = (3 * d * d + 3 * d) + (d * d + d)
    mlp = (d * hidden + hidden) + (hidden * d + d)
    layer = attn + mlp + 2 * (2 * d)  # two LayerNorms
    heads = d * (cfg.text_vocab + cfg.text_len) + d * cfg.image_vocab
    return cfg.layers * layer + 2 * d + heads  # + the final LayerNorm


def param_count(cfg: DalleConfig) -> int:
    """Parameters of `Dalle(cfg)`, computed without building it."""
    return _embedding_params(cfg) + _non_embedding_params(cfg)


def largest_layer_params(cfg: DalleConfig) -> int:
    """Elements of the biggest single parameter tensor (what ZeRO-3 must gather at once)."""
    d = cfg.d_model
    text_rows = cfg.text_vocab + cfg.text_len
    return max(text_rows * d, cfg.image_vocab * d, 3 * d * d, cfg.mlp_ratio * d * d, cfg.text_len * d)


def flops_per_token(cfg: DalleConfig) -> float:
    """Training FLOPs per token (forward + backward): 6 per non-embedding parameter (counting both heads for every
    token, a slight over-estimate) plus 12 * d_model per visible key per layer for QK^T and AV."""
    attention = sum(
        12 * cfg.d_model * mean_visible_keys(kind, cfg.text_len, cfg.image_grid, cfg.conv_kernel)
        for kind in layer_kinds(cfg.layers)
    )
    return 6.0 * _non_embedding_params(cfg) + attention


def text_ids(text: torch.Tensor, text_vocab: int) -> torch.Tensor:
    """Replace padding (0) at position p with its own token `text_vocab + p`."""
    positions = torch.arange(text.shape[-1], device=text.device)
    return torch.where(text == 0, text_vocab + positions, text)


def _cross_entropies(cfg: DalleConfig, text, image, text_logits, image_logits, reduction: str):
    """Text and image cross-entropy: means over the batch's tokens ("mean") or each sample's ("sample")."""
    targets = text_ids(text, cfg.text_vocab)[:, 1:]
    # float32 whatever the autocast dtype: a bf16 log-softmax over 8-16k classes loses the small probabilities.
    if reduction == "mean":
        return (
            F.cross_entropy(text_logits.float().flatten(0, 1), targets.flatten()),
            F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten()),
        )
    text_loss = F.cross_entropy(text_logits.float().transpose(1, 2), targets, reduction="none").mean(1)
    image_loss = F.cross_entropy(image_logits.float().transpose(1, 2), image, reduction="none").mean(1)
    return text_loss, image_loss


def sample_losses(model: nn.Module, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each sample's (loss, text loss, image loss), [B] each, through `model`'s own call (so a ZeRO-3
    engine's hooks gather the partitions); the batch means of `Dalle.loss` are their means."""
    cfg = model.cfg
    text_logits, image_logits = model(text, image)
    text_loss, image_loss = _cross_entropies(cfg, text, image, text_logits, image_logits, "sample")
    return cfg.text_loss_weight * text_loss + cfg.image_loss_weight * image_loss, text_loss, image_loss


class _Block(nn.Module):
    def __init__(self, cfg: DalleConfig, kind: str) -> None:
        super().__init__()
        d = cfg.d_model
        self.kind = kind
        self.geometry = (cfg.text_len, cfg.image_grid, cfg.conv_kernel)
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.heads, cfg.attention)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))

    def mask(self, device: torch.device):
        """This layer's attention mask on `device` (cached; looked up outside compiled code)."""
        return self.attn.mask(self.kind, *self.geometry, device)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), self.kind, *self.geometry, mask=mask)
        return x + self.mlp(self.ln2(x))

    def forward_cached(self, x: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """`forward` for positions [start, start + n) only, reading/extending this layer's `cache`."""
        x = x + self.attn.forward_cached(self.ln1(x), cache, start, self.kind, *self.geometry)
        return x + self.mlp(self.ln2(x))


class Dalle(nn.Module):
    """Decoder-only transformer over [text | image] tokens; see the module docstring for the layout."""

    def __init__(self, cfg: DalleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.text_emb = nn.Embedding(cfg.text_vocab + cfg.text_len, d)
        self.text_pos = nn.Embedding(cfg.text_len, d)
        self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.row_emb = nn.Embedding(cfg.image_grid, d)
        self.col_emb = nn.Embedding(cfg.image_grid, d)
        self.blocks = nn.ModuleList(_Block(cfg, kind) for kind in layer_kinds(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab + cfg.text_len, bias=False)
        self.image_head = nn.Linear(d, cfg.image_vocab, bias=False)
        self._init_weights()
        log.debug("Dalle: %d layers, d_model %d, %d parameters", cfg.layers, d, param_count(cfg))

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere; the projections that write into the residual stream are shrunk by
        # 1/sqrt(2 * layers) so the residual's variance at init does not grow with depth. Through `apply`, one
        # module at a time: under `deepspeed.zero.Init` it gathers each module's partitioned parameters for the
        # call and re-partitions them after, so the 12B model is never whole on a rank. Only leaf modules hold
        # parameters, and `apply` visits them in the same order as `modules()`, so the draws are the same.
        residual = {id(m) for block in self.blocks for m in (block.attn.out, block.mlp[2])}
        residual_std = 0.02 / math.sqrt(2 * self.cfg.layers)

        def base(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        def shrink(module: nn.Module) -> None:
            if id(module) in residual:
                nn.init.normal_(module.weight, std=residual_std)

        self.apply(base)
        self.apply(shrink)

    def compile_units(self) -> list[nn.Module]:
        """What `torch.compile` compiles (`pipeline.train.engine.compile_blocks`): the blocks."""
        return list(self.blocks)

    def embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Token + position embeddings of the whole sequence, [B, L, d_model]. Every table is read
        through its module's call, never as `.weight`: under ZeRO-3 a parameter is whole only
        inside its own module's forward (DeepSpeed's hooks gather it there)."""
        cfg = self.cfg
        if text.ndim != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be [B, {cfg.text_len}], got {list(text.shape)}")
        if image.ndim != 2 or image.shape[1] != cfg.image_len or image.shape[0] != text.shape[0]:
            raise ValueError(f"image must be [{text.shape[0]}, {cfg.image_len}], got {list(image.shape)}")
        txt = self.text_emb(text_ids(text, cfg.text_vocab)) + self.text_pos(
            torch.arange(cfg.text_len, device=text.device)
        )
        cells = torch.arange(cfg.image_grid, device=image.device)
        grid_pos = (self.row_emb(cells)[:, None, :] + self.col_emb(cells)[None, :, :]).reshape(cfg.image_len, -1)
        return torch.cat([txt, self.image_emb(image) + grid_pos], dim=1)

    def forward(self, text: torch.Tensor, image: torch.Tensor, return_loss: bool = False):
        """(text_logits [B, T-1, text_vocab + text_len], image_logits [B, N, image_vocab]); with
        `return_loss`, `loss`'s (loss, parts) instead (so a DeepSpeed engine's forward, whose
        hooks gather ZeRO-3 partitions, computes the loss too)."""
        x = self.embed(text, image)
        for block in self.blocks:
            mask = block.mask(x.device)
            if self.cfg.checkpoint_activations and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        # The last position would predict past the end of the image; drop it before the final norm and heads.
        h = self.ln_f(x[:, :-1])
        split = self.cfg.text_len - 1
        text_logits, image_logits = self.text_head(h[:, :split]), self.image_head(h[:, split:])
        if not return_loss:
            return text_logits, image_logits
        text_loss, image_loss = _cross_entropies(self.cfg, text, image, text_logits, image_logits, "mean")
        loss = self.cfg.text_loss_weight * text_loss + self.cfg.image_loss_weight * image_loss
        # the parts stay on the device: reading them here would wait for the GPU every step
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted text + image cross-entropy, and the two parts (detached) for logging."""
        return self(text, image, return_loss=True)

    # Incremental decoding (used by `pipeline.models.sampling`): the same computation as `forward`, split into
    # spans of positions whose attention keys/values are kept in per-layer caches.

    def new_caches(self, batch: int) -> list[KVCache]:
        """Empty per-layer key/value caches for `batch` sequences, on the parameters' device and dtype."""
        p = self.image_head.weight
        heads = self.cfg.heads
        return [
            KVCache(batch, heads, self.cfg.d_model // heads, self.cfg.seq_len, p.device, p.dtype) for _ in self.blocks
        ]

    def embed_span(self, text: torch.Tensor | None, image: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        """Embeddings of positions [start, end) of the sequence, [B, end - start, d_model], equal to
        `embed(text, image)[:, start:end]`. `text` is the raw [B, T] text (needed only if the span has text
        positions); `image` holds at least the image tokens 0 .. end - T - 1 (only if the span has image ones)."""
        cfg = self.cfg
        if not 0 <= start < end <= cfg.seq_len:
            raise ValueError(f"span [{start}, {end}) is not inside [0, {cfg.seq_len})")
        parts = []
        if start < cfg.text_len:
            stop = min(end, cfg.text_len)
            if text is None or text.ndim != 2 or text.shape[1] != cfg.text_len:
                raise ValueError(f"text must be [B, {cfg.text_len}] for a span with text positions")
            # Padding ids depend on the absolute position, so map the whole row before slicing.
            ids = text_ids(text, cfg.text_vocab)[:, start:stop]
            parts.append(self.text_emb(ids) + self.text_pos(torch.arange(start, stop, device=text.device)))
        if end > cfg.text_len:
            j0, j1 = max(start, cfg.text_len) - cfg.text_len, end - cfg.text_len
            if image is None or image.ndim != 2 or image.shape[1] < j1:
                raise ValueError(f"image must hold at least {j1} tokens for the span [{start}, {end})")
            j = torch.arange(j0, j1, device=image.device)
            grid_pos = self.row_emb(j // cfg.image_grid) + self.col_emb(j % cfg.image_grid)
            parts.append(self.image_emb(image[:, j0:j1]) + grid_pos)
        return torch.cat(parts, dim=1)

    def forward_cached(
        self, text: torch.Tensor | None, image: torch.Tensor | None, start: int, end: int, caches: list[KVCache]
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states of positions [start, end), [B, end - start, d_model], running the blocks
        on those positions only; `caches` (from `new_caches`) must hold positions [0, start) and are extended.
        Project a position with `head_logits`."""
        x = self.embed_span(text, image, start, end)
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.forward_cached(x, cache, start)
        return self.ln_f(x)

    def head_logits(self, h: torch.Tensor, position: int) -> torch.Tensor:
        """Logits from the hidden state `h` [..., d_model] of sequence position `position`: the text head for
        p < T - 1 (predicting text' p + 1), the image head for T - 1 <= p < T + N - 1 (predicting image
        token p - (T - 1)). The last position predicts nothing, as in `forward`."""
        cfg = self.cfg
        if not 0 <= position < cfg.seq_len - 1:
            raise ValueError(f"position {position} predicts nothing; it must be in [0, {cfg.seq_len - 1})")
        return self.text_head(h) if position < cfg.text_len - 1 else self.image_head(h)


def save_dalle(model: Dalle, url: str, dtype: torch.dtype = torch.float32) -> list[str]:
    """Writes the weights (sharded safetensors, `pipeline.models.weight_files`) and `config.json`
    ({"model": DalleConfig}) under `url`, the weights first, so a folder with a config always has its
    weights; returns the file names."""
    from pipeline.models.weight_files import write_state

    files = write_state(url, model.state_dict(), dtype)
    write_dalle_config(model.cfg, url)
    return [*files, "config.json"]


def write_dalle_config(cfg: DalleConfig, url: str) -> None:
    import json

    from pipeline import storage

    storage.write_atomic(storage.join(url, "config.json"), json.dumps({"model": cfg.to_dict()}).encode())


def load_dalle(url: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Dalle:
    """The transformer `save_dalle` (or the train stage, or `dalle export`) wrote under `url`, in eval mode,
    in `dtype` (as stored when None) on `device`. Built on the meta device and given the stored tensors as
    its parameters, cast shard by shard on their way: no float32 copy on the host, no second copy anywhere."""
    from pipeline import storage
    from pipeline.models.weight_files import iter_tensors

    config = storage.read_json(storage.join(url, "config.json"))
    with torch.device("meta"):
        model = Dalle(DalleConfig.from_dict(config["model"]))
    model.load_state_dict(dict(iter_tensors(url, device, dtype)), assign=True)
    return model.eval()
