"""The dVAE's training task (what Ray Train's workers run) and its held-out scores: the model
side of the dvae stage, imported by the workers and, to score, by the stage."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.config.models import DVAESection
from pipeline.data.image_tensors import to_tensor, to_uint8
from pipeline.data.images import decode_rgb, grid
from pipeline.data.shards import Sample
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
