"""Side by side with lucidrains' DALLE-pytorch (PyPI `dalle-pytorch` 1.6.6): the demo's transformer
and theirs at the same size and attention schedule, trained in one process on the demo's encoded
shards with the same batches, optimiser and schedule, as JSON.

    make peer                                        # dalle-pytorch into .peer/ (its own environment)
    .venv/bin/python benchmarks/peer_dalle_pytorch.py [--encoded runs/demo/encode] [--steps 800]

Both models: 4 layers, 4 heads x 32, the paper's schedule for 4 layers (row, column, row, conv),
text 1/8 and image 7/8 of the loss; ours as the demo recipe builds it, theirs with its defaults
(rotary embeddings, token shift) and `attn_types=('axial_row', 'axial_col', 'axial_row',
'conv_like')`. Each update trains both on the same micro-batch from the training split (the
demo's 64 held-out samples kept out), the order of the two alternating from update to update;
the optimiser is the recipe's AdamW with its warm-up and cosine schedule. Reported: each model's
median step time and training tokens/s, and both held-out losses after the same samples, with
the ratios ours / theirs.

dalle-pytorch is installed with `--no-deps` into `.peer/` with the small packages its DALLE class
imports; `benchmarks/peer_stubs/` stands in for `taming` (only its VQGAN wrapper imports it) and
`pkg_resources` (only for its version string). Torchvision is not needed by the DALLE class.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = {"layers": 4, "heads": 4, "head_dim": 32}
THEIR_SCHEDULE = ("axial_row", "axial_col", "axial_row", "conv_like")


def peer_modules():
    """dalle-pytorch's DALLE and DiscreteVAE from `.peer/` (see the module docstring)."""
    sys.path[:0] = [str(ROOT / ".peer"), str(ROOT / "benchmarks" / "peer_stubs")]
    try:
        from dalle_pytorch import DALLE, DiscreteVAE
    except ImportError as err:
        sys.exit(f"peer_dalle_pytorch: dalle-pytorch is not installed ({err}); run `make peer` first")
    return DALLE, DiscreteVAE


def load_split(encoded: str, holdout: int) -> tuple[list, list]:
    """(train, held-out) lists of (text ids, image ids) from the encoded shards."""
    from pipeline.data.loader import read_span, split_holdout
    from pipeline.data.shards import npy_load
    from pipeline.engine.ledger import Ledger

    def pairs(spans):
        return [
            (npy_load(s["text_tokens.npy"]).astype(np.int64), npy_load(s["image_tokens.npy"]).astype(np.int64))
            for span in spans
            for s in read_span(span)
        ]

    spans = Ledger(encoded).spans()
    if not spans:
        sys.exit(f"peer_dalle_pytorch: no encoded shards under {encoded}; run `make demo` (or the demo until encode)")
    train, held = split_holdout(spans, holdout)
    return pairs(train), pairs(held)


def batch_of(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.stack([t for t, _ in items])), torch.from_numpy(np.stack([i for _, i in items]))


class Ours:
    name = "ours"

    def __init__(self, plan: dict, text_len: int, attention: str):
        from pipeline.models.transformer import Dalle, DalleConfig

        grid = int(round(plan["image_tokens"] ** 0.5))
        cfg = DalleConfig(
            **ARCHITECTURE,
            text_len=text_len,
            text_vocab=plan["text_vocab"],
            image_grid=grid,
            image_vocab=plan["image_vocab"],
            attention=attention,
        )
        self.model = Dalle(cfg).train()

    def loss(self, text, image):
        return self.model(text, image, return_loss=True)[0]

    @torch.no_grad()
    def heldout(self, text, image) -> tuple[float, float]:
        from pipeline.models.transformer import sample_losses

        self.model.eval()
        _, text_loss, image_loss = sample_losses(self.model, text, image)
        self.model.train()
        return float(text_loss.mean()), float(image_loss.mean())


class Theirs:
    name = "dalle_pytorch"

    def __init__(self, plan: dict, text_len: int, image_size: int):
        DALLE, DiscreteVAE = peer_modules()
        grid = int(round(plan["image_tokens"] ** 0.5))
        layers = int(round(np.log2(image_size // grid)))
        # only its sizes are read (image side, codebook, downsampling); the shards hold the tokens
        vae = DiscreteVAE(image_size=image_size, num_tokens=plan["image_vocab"], num_layers=layers, hidden_dim=16)
        self.model = DALLE(
            dim=ARCHITECTURE["heads"] * ARCHITECTURE["head_dim"],
            vae=vae,
            num_text_tokens=plan["text_vocab"],
            text_seq_len=text_len,
            depth=ARCHITECTURE["layers"],
            heads=ARCHITECTURE["heads"],
            dim_head=ARCHITECTURE["head_dim"],
            attn_types=THEIR_SCHEDULE,
            loss_img_weight=7,
        ).train()
        self.text_len = text_len

    def loss(self, text, image):
        return self.model(text.clone(), image, return_loss=True)

    @torch.no_grad()
    def heldout(self, text, image) -> tuple[float, float]:
        m = self.model.eval()
        logits = m(text.clone(), image).float()
        self.model.train()
        t = self.text_len
        # its labels: the text after <bos> (padding as per-position tokens), then the image offset past the text
        padded = torch.where(text == 0, torch.arange(t) + (m.num_text_tokens - t), text)
        text_loss = F.cross_entropy(logits[:, :t].flatten(0, 1), padded.flatten())
        image_loss = F.cross_entropy(logits[:, t:].flatten(0, 1), (image + m.num_text_tokens).flatten())
        return float(text_loss), float(image_loss)


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoded", default=str(ROOT / "runs" / "demo" / "encode"))
    parser.add_argument("--recipe", default=str(ROOT / "jobs" / "demo.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="updates (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from pipeline import storage
    from pipeline.config.recipe import load_recipe
    from pipeline.train.schedules import learning_rate

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    section, cfg = recipe.transformer, recipe.transformer.train
    steps = args.steps or cfg.steps
    plan = storage.read_json(storage.join(args.encoded, "_plan.json"))
    train, held = load_split(args.encoded, section.holdout)
    batch = cfg.batch_size * cfg.workers * cfg.grad_accum  # the recipe's global batch, as one micro-batch

    torch.manual_seed(cfg.seed)
    text_len = recipe.text_tokenizer.text_len
    models = [Ours(plan, text_len, "sdpa"), Theirs(plan, text_len, recipe.dvae.image_size)]
    optimizers = [
        torch.optim.AdamW(trainable(m.model), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        for m in models
    ]
    order = random.Random(cfg.seed)
    times: dict[str, list[float]] = {m.name: [] for m in models}
    losses: dict[str, list[float]] = {m.name: [] for m in models}
    index = list(range(len(train)))
    for step in range(steps):
        if step % max(len(train) // batch, 1) == 0:
            order.shuffle(index)
        at = (step % max(len(train) // batch, 1)) * batch
        text, image = batch_of([train[i] for i in index[at : at + batch]])
        lr = learning_rate(step, cfg)
        pairs = list(zip(models, optimizers))
        for model, optimizer in pairs if step % 2 == 0 else pairs[::-1]:
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            loss = model.loss(text, image)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable(model.model), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[model.name].append(time.perf_counter() - start)
            losses[model.name].append(float(loss.detach()))

    text, image = batch_of(held)
    tokens = text.shape[1] + image.shape[1]
    result: dict = {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "steps": steps,
        "batch": batch,
        "samples": steps * batch,
        "heldout_samples": len(held),
    }
    for model in models:
        step_s = statistics.median(times[model.name][10:] or times[model.name])
        text_loss, image_loss = model.heldout(text, image)
        result[model.name] = {
            "params": sum(p.numel() for p in trainable(model.model)),
            "step_s": round(step_s, 5),
            "tokens_per_s": round(batch * tokens / step_s, 1),
            "final_train_loss": round(float(np.mean(losses[model.name][-20:])), 4),
            "heldout_text_loss": round(text_loss, 4),
            "heldout_image_loss": round(image_loss, 4),
        }
    ours, theirs = result["ours"], result["dalle_pytorch"]
    result["ratios"] = {
        "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "heldout_image_loss": round(ours["heldout_image_loss"] / theirs["heldout_image_loss"], 4),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
