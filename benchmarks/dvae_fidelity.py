"""dVAE fidelity: what survives a token round trip, read by the ground-truth analyzer, as JSON.

    .venv/bin/python benchmarks/dvae_fidelity.py runs/demo/dvae/dvae.pt [--count 200 --seed 1]

Renders `--count` fresh one-object scenes at the synthetic set's 96 px, downsizes them to the
dVAE's side, encodes them to argmax tokens and decodes them, then scores the analyzer's reading of
each reconstruction (colour, shape, size, position, count, whole caption) against the truth. The
same scores on the originals come alongside as the analyzer's own ceiling. Generated images can be
no more right than their tokens, so this bounds the evaluate stage's accuracy for this dVAE.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch
from PIL import Image

from pipeline.models.dvae import load_dvae
from pipeline.synthetic.analyzer import analyze, score
from pipeline.synthetic.captions import COLOURS, POSITIONS, SHAPES, SIZES
from pipeline.synthetic.dataset import render


def accuracy(images: list[np.ndarray], objects: list[dict]) -> dict[str, float]:
    totals: dict[str, int] = {}
    for image, obj in zip(images, objects, strict=True):
        for key, ok in score(analyze(image), [obj]).items():
            totals[key] = totals.get(key, 0) + ok
    return {key: round(n / len(images), 4) for key, n in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dvae", help="a dvae.pt written by the dvae stage")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    try:
        model = load_dvae(args.dvae).eval()
    except (OSError, ValueError) as err:
        parser.exit(2, f"dvae_fidelity: {err}\n")
    rng = random.Random(args.seed)
    objects, images, side = [], [], model.image_size
    for _ in range(args.count):
        obj = {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(SIZES),
            "position": rng.choice(POSITIONS),
        }
        image, _ = render([obj], 96, rng)
        images.append(np.asarray(image.resize((side, side), Image.Resampling.BICUBIC)))
        objects.append(obj)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    recon = model.decode(model.tokens(x)).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    figures = {
        "dvae": args.dvae,
        "count": args.count,
        "grid": model.grid,
        "vocab_size": model.vocab_size,
        "reconstructed": accuracy(list(recon), objects),
        "original": accuracy(images, objects),
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
