"""dvae: train the discrete VAE on the filtered images (Ray Train + DeepSpeed), or check given
weights (ours or OpenAI's `encoder.pkl`/`decoder.pkl`); either way the stage commits `dvae.pt`,
the weights the encode stage uses, `reconstructions.png` and `metrics.json`: their
reconstruction error on held-out filtered images next to the error of the held-out mean image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import storage
from pipeline.data.images import decode_rgb, png_bytes
from pipeline.data.loader import read_span, split_holdout
from pipeline.engine.ledger import Attempt, Ledger, checksum_files
from pipeline.errors import InputError
from pipeline.stages.base import RunContext
from pipeline.stages.model_stage import ModelStage


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
    task = "pipeline.stages.dvae_task:DVAETask"

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
        import torch

        from pipeline.models.dvae import load_dvae
        from pipeline.stages.dvae_task import reconstruction_scores

        model = load_dvae(storage.join(attempt.folder, "dvae.pt"))
        scores, image = reconstruction_scores(model, self.held_out(), torch.device("cpu"))
        attempt.write("reconstructions.png", png_bytes(image))
        return scores
