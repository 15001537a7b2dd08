"""dvae: train the discrete VAE on the filtered images (Ray Train + DeepSpeed), or check given
weights (ours or OpenAI's `encoder.pkl`/`decoder.pkl`); either way the stage commits `dvae.pt`,
the weights the encode stage uses, `reconstructions.png` and `metrics.json`: their
reconstruction error on held-out filtered images next to the error of the held-out mean image.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import DVAESection
from pipeline.data.images import decode_rgb, grid, png_bytes, to_tensor, to_uint8
from pipeline.data.loader import read_span, split_holdout
from pipeline.data.shards import Sample
from pipeline.engine.ledger import Attempt, Ledger, checksum_files
from pipeline.errors import InputError
from pipeline.stages.base import RunContext
from pipeline.stages.model_stage import ModelStage
from pipeline.train.schedules import cosine


def schedules(cfg: DVAESection, step: int) -> tuple[float, float]:
    """(Gumbel temperature, KL weight) at `step`: the paper's cosine anneals."""
    temperature = cosine(cfg.temperature_start, cfg.temperature_end, step, cfg.temperature_steps)
    return temperature, cosine(0.0, cfg.kl_weight, step, cfg.kl_steps)


def noise_scale(cfg: DVAESection, step: int) -> float:
    """The Gumbel noise's scale at `step`: cosine from 1 to `gumbel_noise_end` over `temperature_steps`."""
    return cosine(1.0, cfg.gumbel_noise_end, step, cfg.temperature_steps)


def codebook_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Perplexity of the batch's mean code distribution and the fraction of codes used by argmax,
    as device tensors (no host sync in the step)."""
    k = logits.shape[1]
    probs = logits.float().softmax(1).mean(dim=(0, 2, 3))
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    used = torch.zeros(k, device=logits.device).scatter_(0, logits.argmax(1).flatten(), 1.0).sum()
    return {"perplexity": entropy.exp(), "codebook_usage": used / k}


@torch.no_grad()
def reconstruction_scores(model: nn.Module, images: np.ndarray, device: torch.device) -> tuple[dict, np.ndarray]:
    """Token round trip (argmax encode, decode) of uint8 images: MSE against the originals and
    against the images' own mean image (the baseline to beat), PSNR, and a comparison grid."""
    x = to_tensor(images, device)
    recon = model.decode(model.tokens(x)).float()
    mse = float(((recon - x) ** 2).mean())
    mean_mse = float(((x.mean(0, keepdim=True) - x) ** 2).mean())
    scores = {
        "recon_mse": mse,
        "mean_image_mse": mean_mse,
        "recon_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
    }
    shown = min(len(images), 8)
    return scores, grid([images[:shown], to_uint8(recon[:shown])])


class DVAETask:
    """The dVAE as a `pipeline.train.loop.TrainTask`."""

    def __init__(self, config: dict[str, Any]):
        self.cfg = DVAESection.model_validate(config)

    def build_model(self) -> nn.Module:
        from pipeline.models.dvae import DVAE, DVAEConfig

        return DVAE(self.cfg.build(DVAEConfig))

    def decode(self, sample: Sample) -> np.ndarray:
        return decode_rgb(sample["jpg"], self.cfg.image_size)

    def collate(self, items: list[np.ndarray], device: torch.device, dtype: torch.dtype | None) -> dict:
        x = to_tensor(items, device)
        return {"images": x.to(dtype) if dtype is not None else x}

    def loss(self, engine, batch: dict, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        temperature, kl_weight = schedules(self.cfg, step)
        cfg, noise = self.cfg, noise_scale(self.cfg, step)
        out = engine(
            batch["images"],
            temperature,
            kl_weight,
            generator,
            straight_through=cfg.straight_through,
            usage_weight=cfg.usage_weight,
            mse_weight=cfg.mse_weight,
            noise=noise,
        )
        stats = {"nll": out.nll.detach(), "kl": out.kl.detach(), "temperature": temperature, "kl_weight": kl_weight}
        stats["gumbel_noise"] = noise
        return out.loss, {**stats, **codebook_stats(out.logits.detach())}

    def evaluate(self, model: nn.Module, held: list[np.ndarray], device: torch.device) -> tuple[dict, dict]:
        if not held:
            return {}, {}
        scores, image = reconstruction_scores(model, np.stack(held), device)
        return scores, {"reconstructions": image}

    def export(self, model: nn.Module, out_url: str) -> list[str]:
        from pipeline.models.dvae import save_dvae

        save_dvae(model.float().cpu(), storage.join(out_url, "dvae.pt"))
        return ["dvae.pt"]


def weight_files(path: str) -> list[str]:
    """The files of the dVAE weights at `path`: OpenAI's encoder.pkl + decoder.pkl, or our
    dvae.pt (in a folder or named directly). Raises InputError when there are none."""
    for names in (["encoder.pkl", "decoder.pkl"], ["dvae.pt"]):
        urls = [storage.join(path, n) for n in names]
        if all(storage.exists(u) for u in urls):
            return urls
    if path.endswith(".pt") and storage.exists(path):
        return [path]
    raise InputError(f"dvae.weights: {path} holds neither dvae.pt nor OpenAI's encoder.pkl and decoder.pkl")


def load_weights(path: str):
    """The dVAE at `path` (see `weight_files`)."""
    from pipeline.models.dvae import load_dvae
    from pipeline.models.dvae_openai import load_openai_dvae

    files = weight_files(path)
    try:
        return load_openai_dvae(*files) if len(files) == 2 else load_dvae(files[0])
    except ValueError as err:
        raise InputError(f"dvae.weights: {err}") from None


class DVAEStage(ModelStage):
    name = "dvae"
    config_key = "dvae"
    upstream = ("filter",)
    task = "pipeline.stages.dvae:DVAETask"

    def inspect_inputs(self) -> dict[str, Any]:
        if self.cfg.weights is None:
            return {}
        return {"weights": checksum_files(weight_files(storage.absolute(self.cfg.weights)))}

    def held_out(self) -> np.ndarray:
        _, held = split_holdout(Ledger(self.upstream_url("filter")).spans(), self.cfg.reconstructions)
        return np.stack([decode_rgb(s["jpg"], self.cfg.image_size) for span in held for s in read_span(span)])

    def build(self, attempt: Attempt, ctx: RunContext) -> int:
        """Trains (or converts the given weights) into `dvae.pt`."""
        from pipeline.models.dvae import save_dvae

        if self.cfg.weights is None:
            trained = self.train(attempt.folder, ctx, self.cfg.model_dump(mode="json"), self.cfg.reconstructions)
            attempt.adopt("dvae.pt")
            return trained
        model = load_weights(storage.absolute(self.cfg.weights))
        if model.image_size != self.cfg.image_size or model.vocab_size != self.cfg.vocab_size:
            raise InputError(
                f"dvae.weights: {self.cfg.weights} is a {model.image_size} px, K={model.vocab_size} dVAE; "
                f"the recipe says dvae.image_size={self.cfg.image_size}, dvae.vocab_size={self.cfg.vocab_size}"
            )
        save_dvae(model, attempt.path("dvae.pt"))
        return 0

    def score(self, attempt: Attempt) -> dict[str, float]:
        from pipeline.models.dvae import load_dvae

        model = load_dvae(storage.join(attempt.folder, "dvae.pt"))
        scores, image = reconstruction_scores(model, self.held_out(), torch.device("cpu"))
        attempt.write("reconstructions.png", png_bytes(image))
        return scores
