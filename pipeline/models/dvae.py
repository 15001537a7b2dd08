"""The DALL·E discrete VAE (Ramesh et al. 2021): images <-> a grid of tokens from a codebook of K.

The architecture is that of OpenAI's released `dall_e` package (bottleneck residual encoder and
decoder, logit-Laplace likelihood), generalised to any group count and made trainable: plain
`nn.Conv2d` layers whose precision the caller picks with autocast, a Gumbel-softmax relaxation
and the ELBO loss. Parameter names equal `dall_e`'s (with `.w`/`.b` spelled `.weight`/`.bias`),
so `pipeline.models.dvae_openai` can load OpenAI's `encoder.pkl`/`decoder.pkl` without that package.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage
from pipeline.errors import one_line

LOGIT_LAPLACE_EPS = 0.1
FORMAT = "dalle-pipeline-dvae"


@dataclass(frozen=True)
class DVAEConfig:
    """Sizes of a dVAE; the defaults are OpenAI's released model (256 px, K 8192, 4 groups)."""

    image_size: int = 256
    """Side of the (square) images it reads."""
    vocab_size: int = 8192
    """Codebook size K."""
    n_hid: int = 256
    """Width of the first encoder group; group g is 2^(g-1) times wider."""
    n_blk_per_group: int = 2
    """Residual blocks per group."""
    group_count: int = 4
    """Groups; each but the last halves the resolution."""
    n_init: int = 128
    """Channels of the decoder's first 1x1 convolution."""

    def __post_init__(self) -> None:
        if self.image_size % 2 ** (self.group_count - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^(group_count-1)")

    @property
    def grid(self) -> int:
        """Side of the token grid."""
        return self.image_size // 2 ** (self.group_count - 1)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0,1] pixels into [eps, 1-eps], where the logit-Laplace density stays bounded."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)
    # dall_e's initialisation: unit-variance activations at the start, zero biases.
    nn.init.normal_(conv.weight, std=1 / (n_in * kernel**2) ** 0.5)
    nn.init.zeros_(conv.bias)
    return conv


class _ResBlock(nn.Module):
    """Bottleneck residual block; post_gain = 1/L^2 keeps the sum of L blocks near the identity at init."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        n_mid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = (n_in, n_mid, n_mid, n_mid, n_out)
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _tower(
    stem: nn.Conv2d, widths: list[int], n_blk: int, kernels: tuple[int, int, int, int], resample: str, n_out: int
) -> nn.Sequential:
    """dall_e's layout: input conv, groups of residual blocks with a resampling layer between groups, relu + 1x1."""
    layers: list[tuple[str, nn.Module]] = [("input", stem)]
    width, n_layers = stem.out_channels, len(widths) * n_blk
    for g, out in enumerate(widths, 1):
        group = [(f"block_{i + 1}", _ResBlock(width if i == 0 else out, out, n_layers, kernels)) for i in range(n_blk)]
        if g < len(widths):
            group.append(("pool", nn.MaxPool2d(2)) if resample == "pool" else ("upsample", nn.Upsample(scale_factor=2)))
        layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        width = out
    layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _conv(width, n_out, 1))]))))
    return nn.Sequential(OrderedDict(layers))


class Encoder(nn.Module):
    """Image (mapped pixels) -> logits over the codebook, [B, vocab_size, H/2^(g-1), W/2^(g-1)]."""

    def __init__(
        self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:  # fmt: skip
        super().__init__()
        widths = [2 ** (g - 1) * n_hid for g in range(1, group_count + 1)]
        stem = _conv(input_channels, n_hid, 7)
        self.blocks = _tower(stem, widths, n_blk_per_group, (3, 3, 3, 1), "pool", vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """Codebook one-hots [B, vocab_size, h, w] -> [B, 2*output_channels, h*2^(g-1), ...]: logit-Laplace mu, ln b."""

    def __init__(
        self, group_count: int = 4, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2,
        output_channels: int = 3, vocab_size: int = 8192,
    ) -> None:  # fmt: skip
        super().__init__()
        widths = [2 ** (group_count - g) * n_hid for g in range(1, group_count + 1)]
        stem = _conv(vocab_size, n_init, 1)
        self.blocks = _tower(stem, widths, n_blk_per_group, (1, 3, 3, 3), "upsample", 2 * output_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input 1x1 conv of one-hot `tokens` [B, h, w], by indexing its weight (a K-channel one-hot is big)."""
        conv = self.blocks.input
        table = conv.weight[:, :, 0, 0].t()  # [K, n_init]
        return F.embedding(tokens, table).permute(0, 3, 1, 2) + conv.bias[None, :, None, None]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for name, layer in self.blocks.named_children():
            if name != "input":
                x = layer(x)
        return x


def logit_laplace_nll(x_mapped: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise -log p(x) of the logit-Laplace density on (0,1): Laplace(mu, b) on logit(x), times |dlogit/dx|."""
    log_x, log_1mx = torch.log(x_mapped), torch.log1p(-x_mapped)
    return math.log(2.0) + log_b + log_x + log_1mx + (log_x - log_1mx - mu).abs() * torch.exp(-log_b)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits, dim 1) || uniform over K), summed over the latent grid: [B]."""
    logq = F.log_softmax(logits.float(), dim=1)
    k = logits.shape[1]
    per_position = (logq.exp() * logq).sum(dim=1) + math.log(k)
    return per_position.flatten(1).sum(dim=1)


def usage_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the code distribution averaged over the batch and the grid, over log K (1 = every code
    equally used, 0 = one code)."""
    p = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    return -(p * torch.log(p + 1e-10)).sum() / math.log(logits.shape[1])


@dataclass
class DVAEOutput:
    loss: torch.Tensor
    nll: torch.Tensor
    """Mean NLL per pixel dimension."""
    kl: torch.Tensor
    """KL to the uniform prior, summed over the grid, batch mean."""
    recon: torch.Tensor
    """Reconstruction (mode of the likelihood) in [0,1] pixel space, detached."""
    logits: torch.Tensor


class DVAE(nn.Module):
    """Encoder + decoder + the training loss; `config` holds the sizes (what `save_dvae` stores)."""

    def __init__(self, config: DVAEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder(c.group_count, c.n_hid, c.n_blk_per_group, 3, c.vocab_size)
        self.decoder = Decoder(c.group_count, c.n_init, c.n_hid, c.n_blk_per_group, 3, c.vocab_size)

    @property
    def grid(self) -> int:
        return self.config.grid

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def _dtype(self) -> torch.dtype:
        # Inputs follow the weights, so a model cast to bf16 (e.g. by DeepSpeed) works as well as autocast.
        return self.encoder.blocks.input.weight.dtype

    def forward(
        self,
        x01: torch.Tensor,
        temperature: float,
        kl_weight: float,
        generator: torch.Generator | None = None,
        *,
        straight_through: bool = False,
        usage_weight: float = 0.0,
        mse_weight: float = 0.0,
        noise: float = 1.0,
    ) -> DVAEOutput:
        """The loss of a batch of [0,1] images. The paper's is the default: relaxed Gumbel-softmax codes into the
        decoder, logit-Laplace NLL + `kl_weight` x KL. `straight_through` feeds the decoder the one-hot argmax of the
        Gumbel sample (gradients through the relaxed one), so it trains on the codes it decodes at inference;
        `usage_weight` subtracts that much of the normalised entropy of the batch's mean code distribution (keeps
        the codebook in use); `mse_weight` adds that much pixel MSE of the reconstruction (weighs the objects
        against a noisy background); `noise` scales the Gumbel noise (1: a sample of the code distribution, 0:
        its argmax). The last four are for short runs on small data, where the paper's loss collapses onto a few
        codes."""
        x = map_pixels(x01.float())
        logits = self.encoder(x.to(self._dtype)).float()
        # Gumbel-softmax relaxation; the noise comes from `generator` so steps are reproducible.
        device = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape, generator=generator, device=device).to(logits.device)
        fi = torch.finfo(u.dtype)
        u = u.clamp(fi.tiny, 1 - fi.eps)  # keeps -log(-log(u)) finite
        soft = F.softmax((logits - noise * torch.log(-torch.log(u))) / temperature, dim=1)
        codes = soft
        if straight_through:
            hard = F.one_hot(soft.argmax(dim=1), soft.shape[1]).permute(0, 3, 1, 2).to(soft.dtype)
            codes = hard - soft.detach() + soft
        out = self.decoder(codes.to(self._dtype)).float()
        c = out.shape[1] // 2
        mu, log_b = out[:, :c], out[:, c:]
        nll = logit_laplace_nll(x, mu, log_b).mean()
        kl = kl_to_uniform(logits).mean()
        # The ELBO is sum-NLL + KL per image; dividing both by C*H*W keeps the loss per pixel
        # dimension (comparable across image sizes) without changing the NLL/KL balance.
        loss = nll + kl_weight * kl / x01[0].numel()
        recon = unmap_pixels(torch.sigmoid(mu))
        if mse_weight:
            loss = loss + mse_weight * ((recon - x01.float()) ** 2).mean()
        if usage_weight:
            loss = loss - usage_weight * usage_entropy(logits)
        return DVAEOutput(loss=loss, nll=nll, kl=kl, recon=recon.detach(), logits=logits)

    @torch.no_grad()
    def tokens(self, x01: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, grid*grid] (row-major)."""
        return self.encoder(map_pixels(x01.float()).to(self._dtype)).argmax(dim=1).flatten(1)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0,1] from row-major square token grids [B, side*side] (side is usually `grid`)."""
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} tokens per image do not form a square grid")
        out = self.decoder.forward_tokens(tokens.long().view(-1, side, side)).float()
        return unmap_pixels(torch.sigmoid(out[:, : out.shape[1] // 2]))


def save_dvae(model: DVAE, url: str) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": 1, "config": asdict(model.config), "state_dict": state}, buf)
    storage.write_atomic(url, buf.getvalue())


def load_dvae(url: str, map_location: Any = "cpu") -> DVAE:
    try:
        blob = torch.load(io.BytesIO(storage.read_bytes(url)), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{url}: not a dVAE file ({one_line(e, typed=False)})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{url}: not a dVAE file (no '{FORMAT}' format tag)")
    if blob.get("version") != 1:
        raise ValueError(f"{url}: unsupported dVAE file version {blob.get('version')!r}")
    config, keys = blob.get("config"), [f.name for f in fields(DVAEConfig)]
    if not isinstance(config, dict) or set(config) != set(keys):
        raise ValueError(f"{url}: dVAE config {config!r} does not have the keys {tuple(keys)}")
    model = DVAE(DVAEConfig(**config))
    try:
        model.load_state_dict(blob["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{url}: weights do not fit the config ({one_line(e, typed=False)})") from None
    return model
