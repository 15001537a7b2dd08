"""The captioned-shapes task of a recipe (jobs/shapes-gpu.yaml), trained and evaluated in one
process without Ray: what the GPU suite runs, since the GPU machine has no Ray.

    python benchmarks/shapes.py jobs/shapes-gpu.yaml --out DIR [--scale 0.1]   # a GPU
    .venv/bin/python benchmarks/shapes.py jobs/shapes-gpu.yaml --out DIR --tiny  # CPU, seconds

Each step is the pipeline's own code, minus the Ray around it: the synthetic set rendered as in
ingest (clean rows only, as filter would keep), the BPE tokenizer, the dVAE, CLIP and the
transformer trained by their stages' `TrainTask`s through the train stage's DeepSpeed engine
(`local_rank.stage_engine`, `pipeline.train.loop.micro_step`), the encode actor's `encode_shard`,
and the evaluate stage's `evaluate_prompt` and summaries with the recipe's guidance and sweep.
`--scale` multiplies the data and every model's updates (1.0 is the recipe); `--tiny` shrinks
everything to a CPU smoke run. Prints JSON: the stage times, the final losses, the accuracy table,
the guidance sweep, and the device.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from encode import filtered_shard
from local_rank import device_name, stage_engine
from PIL import Image

from pipeline import storage
from pipeline.config.recipe import load_recipe
from pipeline.data.loader import EPOCH, ShardSpan, read_span
from pipeline.engine.ledger import Attempt, Ledger
from pipeline.models.bpe import train_tokenizer
from pipeline.models.generator import ImageGenerator, SamplingConfig
from pipeline.stages.clip_task import ClipTask
from pipeline.stages.dvae_task import DVAETask
from pipeline.stages.encode_shard import Encoders, encode_shard
from pipeline.stages.evaluate import (
    accuracy,
    by_objects,
    evaluate_prompt,
    guidance_curve,
    recipe_prompts,
    sweep_prompts,
)
from pipeline.stages.train import companions
from pipeline.stages.train_task import TransformerTask, recipe_model_config
from pipeline.synthetic.dataset import generate
from pipeline.train.engine import autocast_dtype, set_lr
from pipeline.train.loop import micro_step, step_seed, window_means
from pipeline.train.schedules import learning_rate

# A CPU smoke run of the same chain: every section runs, nothing is expected to be learnt.
TINY = [
    "ingest.synthetic.count=96",
    "dvae.train.steps=4", "dvae.train.batch_size=8", "dvae.temperature_steps=4", "dvae.n_hid=16",
    "dvae.n_init=16", "dvae.n_blk_per_group=1", "dvae.vocab_size=64",
    "clip.train.steps=4", "clip.train.batch_size=8", "clip.vision_width=32", "clip.vision_layers=1",
    "clip.text_width=32", "clip.text_layers=1", "clip.embed_dim=32", "clip.patch_size=16",
    "transformer.preset=demo", "transformer.layers=2", "transformer.train.steps=4", "transformer.train.batch_size=8",
    "transformer.train.warmup_steps=2", "transformer.train.ema_decay=null",
    "evaluate.candidates=4", "evaluate.top=2", "evaluate.seen_one=2", "evaluate.heldout_one=1",
    "evaluate.seen_two=1", "evaluate.heldout_two=1", "evaluate.paraphrased=0", "evaluate.sweep_prompts=1",
    "evaluate.guidance_sweep=[1.0,3.0]", "text_tokenizer.vocab_size=256",
]  # fmt: skip


def scaled(recipe_path: str, scale: float, tiny: bool):
    """The recipe with its data and updates multiplied by `scale` (or shrunk to `TINY`)."""
    recipe = load_recipe(recipe_path, TINY if tiny else [])
    if tiny or scale == 1.0:
        return recipe
    r = recipe
    overrides = [f"ingest.synthetic.count={max(64, round(r.ingest.synthetic.count * scale))}"]
    for section in ("dvae", "clip", "transformer"):
        steps = max(1, round(getattr(r, section).train.steps * scale))
        overrides += [f"{section}.train.steps={steps}", f"{section}.train.warmup_steps={max(1, steps // 20)}"]
    overrides.append(f"dvae.temperature_steps={max(1, round(r.dvae.temperature_steps * scale))}")
    return load_recipe(recipe_path, overrides)


def fit(task, cfg, samples: list[dict], device: torch.device) -> tuple[torch.nn.Module, dict[str, float]]:
    """`cfg.steps` updates of `task` on batches drawn (seeded) from `samples`, each decoded at its
    epoch as the loader would; the trained module and the last 10% of updates' mean metrics."""
    on_gpu = device.type == "cuda"
    engine = stage_engine(task.build_model, cfg, on_gpu)
    dtype = autocast_dtype(cfg, on_gpu)
    rng = np.random.default_rng(cfg.seed)
    window = []
    for step in range(cfg.steps):
        set_lr(engine, learning_rate(step, cfg))
        epoch = step * cfg.batch_size // len(samples)
        items = [task.decode({**samples[i], EPOCH: epoch}) for i in rng.integers(0, len(samples), cfg.batch_size)]
        generator = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 0, 0))
        window.append(micro_step(task, engine, items, step, generator, device, dtype))
    return engine.module, window_means(window[-max(1, len(window) // 10) :])


def rendered(recipe) -> tuple[np.ndarray, list[str]]:
    """The clean synthetic rows at the ingest size, as filter would pass them on."""
    data = generate(recipe.ingest.synthetic)
    size = recipe.ingest.image_size
    images, captions = [], []
    for row in data.rows:
        if row["kind"] == "clean":
            with Image.open(io.BytesIO(data.files[row["path"]][0])) as image:
                images.append(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
            captions.append(row["caption"])
    return np.stack(images), captions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--out", required=True, help="folder for the models and the encoded shard")
    p.add_argument("--scale", type=float, default=1.0, help="data and updates, as a fraction of the recipe's")
    p.add_argument("--tiny", action="store_true", help="a CPU smoke run of every step")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = scaled(args.recipe, args.scale, args.tiny)
    out = Path(args.out).resolve()
    urls = companions(recipe, str(out))
    seconds: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}

    def timed(name: str, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    images, captions = rendered(recipe)
    shard = filtered_shard(images, captions, out / "filter")
    samples = read_span(ShardSpan(shard.url, shard.count))
    tokenizer = train_tokenizer(captions, vocab_size=recipe.text_tokenizer.vocab_size)
    storage.write_atomic(urls["tokenizer"], tokenizer.to_str().encode())
    timed("data", started)

    started = time.perf_counter()
    dvae_task = DVAETask(recipe.dvae.model_dump(mode="json"))
    model, losses["dvae"] = fit(dvae_task, recipe.dvae.train, samples, device)
    dvae_task.export(model, str(out / "dvae"))
    timed("dvae", started)

    started = time.perf_counter()
    clip_task = ClipTask({"clip": recipe.clip.model_dump(mode="json"), "tokenizer": urls["tokenizer"]})
    model, losses["clip"] = fit(clip_task, recipe.clip.train, samples, device)
    clip_task.export(model, str(out / "clip"))
    timed("clip", started)

    started = time.perf_counter()
    on = "cuda" if device.type == "cuda" else "cpu"
    encoders = Encoders.load(
        **{k: urls[k] for k in ("dvae", "clip", "tokenizer")},
        text_len=recipe.text_tokenizer.text_len,
        batch_size=recipe.encode.batch_size,
        device=on,
    )
    attempt = Attempt(Ledger(str(out / "encode")), shard.shard, "shapes")
    encode_shard(encoders, shard, attempt, recipe.encode.clip_threshold)
    encoded = read_span(ShardSpan(storage.join(attempt.folder, f"{shard.shard}.tar"), shard.count))
    timed("encode", started)

    started = time.perf_counter()
    section = recipe.transformer
    transformer_task = TransformerTask(
        {
            "model": recipe_model_config(recipe).to_dict(),
            "null_caption_prob": section.train.null_caption_prob,
            "seed": section.train.seed,
            "models": urls,
        }
    )
    held, train = encoded[: section.holdout], encoded[section.holdout :] or encoded
    model, losses["transformer"] = fit(transformer_task, section.train, train, device)
    losses["transformer"].update(
        transformer_task.evaluate(model, [transformer_task.decode(s) for s in held], device)[0]
    )
    transformer_task.export(model, str(out / "train"))
    timed("train", started)

    started = time.perf_counter()
    gen = ImageGenerator.load(str(out / "train"), device=on)
    cfg = recipe.evaluate
    prompts = recipe_prompts(recipe)
    sampling = SamplingConfig(batch_size=cfg.batch_size, guidance=cfg.guidance, seed=cfg.seed)
    records = [evaluate_prompt(gen, prompt, cfg.candidates, cfg.top, sampling)[0] for prompt in prompts]
    swept = sweep_prompts(prompts, cfg.sweep_prompts)
    for scale in cfg.guidance_sweep:
        at = SamplingConfig(batch_size=cfg.batch_size, guidance=float(scale), seed=cfg.seed)
        records += [{**evaluate_prompt(gen, q, cfg.candidates, cfg.top, at)[0], "sweep": True} for q in swept]
    timed("evaluate", started)

    main_records = [r for r in records if not r.get("sweep")]
    print(
        json.dumps(
            {
                "benchmark": "shapes",
                "recipe": args.recipe,
                "scale": "tiny" if args.tiny else args.scale,
                "device": device_name(device),
                "images": len(images),
                "seconds": seconds,
                "losses": losses,
                "accuracy": accuracy(main_records),
                "objects": by_objects(main_records),
                "guidance_sweep": guidance_curve([r for r in records if r.get("sweep")]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
