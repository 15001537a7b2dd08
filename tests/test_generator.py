"""Generation from tiny random models: CLIP reranking really orders the candidates by their CLIP
score, candidates are reproducible from the seed, image completion keeps the given rows, and
`dalle sample` writes the grid, the single images and their scores (or one-line errors)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from helpers import dalle
from PIL import Image

from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.models.clip import ClipConfig, build_clip
from pipeline.models.dvae import DVAE, DVAEConfig, save_dvae
from pipeline.models.generator import ImageGenerator, SamplingConfig, candidate_seed, rerank
from pipeline.models.transformer import Dalle, DalleConfig, save_dalle
from pipeline.synthetic.captions import COLOURS, POSITIONS, SHAPES, SIZES, caption

PROMPT = "a large red circle on the left"
CLIP = ClipConfig(
    image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
    text_width=32, text_layers=1, text_heads=2, text_len=16, embed_dim=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A transformer folder with its dVAE, CLIP and tokenizer (random weights) named in models.json."""
    root = tmp_path_factory.mktemp("gen")
    rng = random.Random(0)
    captions = [
        caption([{"colour": c, "shape": s, "size": z, "position": p}], None, rng)
        for c in COLOURS
        for s in SHAPES
        for z in SIZES
        for p in POSITIONS
    ]
    bpe = train_tokenizer(captions, vocab_size=200)
    (root / "tokenizer.json").write_text(bpe.to_str())
    torch.manual_seed(0)
    save_dvae(
        DVAE(DVAEConfig(image_size=32, vocab_size=16, n_hid=8, n_blk_per_group=1, group_count=4, n_init=8)),
        str(root / "dvae.pt"),
    )
    build_clip(CLIP, bpe).save(str(root / "clip"))
    cfg = DalleConfig(
        layers=2,
        heads=2,
        head_dim=8,
        text_len=12,
        text_vocab=bpe.get_vocab_size(),
        image_grid=4,
        image_vocab=16,
        conv_kernel=3,
    )
    save_dalle(Dalle(cfg), str(root / "model"))
    names = {"dvae": root / "dvae.pt", "clip": root / "clip", "tokenizer": root / "tokenizer.json"}
    (root / "model" / "models.json").write_text(json.dumps({k: str(v) for k, v in names.items()}))
    return root


@pytest.fixture(scope="module")
def gen(folder):
    return ImageGenerator.load(str(folder / "model"), device="cpu")


def test_rerank_is_a_stable_descending_order():
    scores = np.array([0.1, 0.5, 0.3, 0.5, -0.2])
    assert rerank(scores).tolist() == [1, 3, 2, 0, 4]


@torch.no_grad()
def test_generate_orders_candidates_by_their_clip_score(gen):
    result = gen.generate(PROMPT, 12, SamplingConfig(batch_size=5, seed=3))
    assert result.tokens.shape == (12, 16) and result.images.shape == (12, 32, 32, 3)
    # The scores are CLIP's cosine of each decoded image with the prompt, computed here independently.
    tokens = gen.clip.tokenize([PROMPT])
    text = gen.clip.text_embeddings(tokens["input_ids"], tokens["attention_mask"])
    image = gen.clip.image_embeddings(gen.clip.preprocess(result.images))
    expected = (image @ text.T).squeeze(1).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(result.scores, 6))) > 1, "a random CLIP should still tell the candidates apart"
    ordered = result.scores[result.order]
    assert (np.diff(ordered) <= 0).all()
    top = result.best(4)
    assert result.scores[top].min() >= np.delete(result.scores, top).max()
    # Decoding is the dVAE's: the images are those of the sampled tokens.
    np.testing.assert_array_equal(result.images, gen.decode(result.tokens))


def test_candidates_are_reproducible_from_the_seed(gen):
    cfg = SamplingConfig(batch_size=4, seed=7, top_k=8)
    a, b = gen.sample(PROMPT, 8, cfg), gen.sample(PROMPT, 8, cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen.sample(PROMPT, 8, SamplingConfig(batch_size=4, seed=8, top_k=8)))
    assert not np.array_equal(a, gen.sample("a small blue star at the top", 8, cfg))
    assert candidate_seed(7, PROMPT, 4) == candidate_seed(7, PROMPT, 4) != candidate_seed(7, PROMPT, 0)
    # the batch is how the work is cut, not what is drawn: any size, or the memory's choice, gives the same
    for size in (3, 8, None):
        np.testing.assert_array_equal(gen.sample(PROMPT, 8, SamplingConfig(batch_size=size, seed=7, top_k=8)), a)
    assert gen.batch_size(SamplingConfig()) >= 8  # a tiny model on this host fits many


def test_guided_candidates_follow_their_seed_and_halve_the_batch(gen):
    plain = SamplingConfig(batch_size=4, seed=7, top_k=8)
    guided = SamplingConfig(batch_size=4, seed=7, top_k=8, guidance=3.0)
    assert SamplingConfig(guidance=1.0).guidance_scale is None  # scale 1 runs no second stream
    a = gen.sample(PROMPT, 8, guided)
    assert not np.array_equal(a, gen.sample(PROMPT, 8, plain))
    np.testing.assert_array_equal(gen.sample(PROMPT, 8, SamplingConfig(batch_size=3, seed=7, top_k=8, guidance=3.0)), a)
    # two streams per candidate: half the candidates fit in the same memory
    assert gen.batch_size(SamplingConfig(guidance=3.0)) == gen.batch_size(SamplingConfig()) // 2


def test_completion_keeps_the_given_rows(gen):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    result = gen.complete(image, PROMPT, 2, 6, SamplingConfig(batch_size=6))
    given = gen.encode(image[None])[0, :8]
    assert (result.tokens[:, :8] == given).all()
    assert len({tuple(t[8:]) for t in result.tokens}) > 1
    with pytest.raises(ValueError, match="rows must be between 0 and 4"):
        gen.complete(image, PROMPT, 5, 2, SamplingConfig())


@pytest.mark.slow
def test_dalle_sample_writes_grid_images_and_scores(folder, tmp_path):
    out = tmp_path / "grid.png"
    r = dalle("sample", str(folder / "model"), PROMPT, "--n", "10", "--top", "6", "--columns", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "6 of 10 candidates" in r.stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 2, 3 * 34 + 2, 3)  # 2 rows x 3 columns of 32 px with 2 px gaps
    info = json.loads((tmp_path / "grid.json").read_text())
    scores = [k["score"] for k in info["kept"]]
    assert len(scores) == 6 and scores == sorted(scores, reverse=True)
    first = np.asarray(Image.open(tmp_path / info["kept"][0]["file"]))
    np.testing.assert_array_equal(first, grid[2:34, 2:34])
    # image completion from the first kept image, its top row of tokens kept
    r = dalle("sample", str(folder / "model"), PROMPT, "--n", "4", "--top", "2", "--out", str(tmp_path / "c.png"),
              "--complete", str(tmp_path / info["kept"][0]["file"]), "--rows", "1", "--guidance", "2.5")  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = dalle("sample", str(folder / "model"), PROMPT, "--guidance", "-1")
    assert r.returncode == 2 and "argument --guidance: expected a number >= 0, got '-1'" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["missing-folder", PROMPT],
            "missing-folder: not a trained transformer folder (model.safetensors.index.json missing)",
        ),
        (["{model}", PROMPT, "--n", "4", "--top", "5"], "--top 5 must be between 1 and --n 4"),
        (["{model}", PROMPT, "--complete", "x.png"], "--complete IMAGE and --rows R go together"),
        (["{model}", PROMPT, "--complete", "nope.png", "--rows", "1"], "--complete: no such image 'nope.png'"),
        (["{model}", "  "], "the prompt is empty"),
        (["{model}", PROMPT, "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    ],
)
def test_dalle_sample_errors_are_one_line(folder, args, message):
    r = dalle("sample", *[a.format(model=folder / "model") for a in args])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"dalle: error: {message}"]


def test_models_json_is_required_without_explicit_paths(folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model-00001.safetensors", "model.safetensors.index.json", "config.json"):
        (bare / name).write_bytes((folder / "model" / name).read_bytes())
    r = dalle("sample", str(bare), PROMPT)
    assert r.returncode == 2 and "no models.json naming the dvae; pass --dvae" in r.stderr
    paths = [
        "--dvae",
        str(folder / "dvae.pt"),
        "--clip",
        str(folder / "clip"),
        "--tokenizer",
        str(folder / "tokenizer.json"),
    ]
    r = dalle("sample", str(bare), PROMPT, "--n", "2", "--top", "1", "--out", str(tmp_path / "g.png"), *paths)
    assert r.returncode == 0, r.stderr
    assert TextTokenizer.load(str(folder / "tokenizer.json"), 12).vocab_size > 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_generation_on_gpu_matches_the_cpu_reranking_path(folder):
    gpu = ImageGenerator.load(str(folder / "model"), device="cuda")
    assert gpu.dtype == torch.bfloat16 and next(gpu.dalle.parameters()).dtype == torch.bfloat16
    result = gpu.generate(PROMPT, 16, SamplingConfig(batch_size=8, seed=1))
    assert result.images.shape == (16, 32, 32, 3) and np.isfinite(result.scores).all()
    # the same images scored on the CPU in fp32 rank the same way up to bf16 rounding
    cpu = ImageGenerator.load(str(folder / "model"), device="cpu")
    np.testing.assert_allclose(cpu.scores(result.images, PROMPT), result.scores, atol=2e-2)
    fp32 = ImageGenerator.load(str(folder / "model"), device="cuda", precision="fp32")
    cfg = SamplingConfig(batch_size=4, seed=2)
    np.testing.assert_array_equal(fp32.sample(PROMPT, 4, cfg), fp32.sample(PROMPT, 4, cfg))
