"""CLIP wrapper: preprocessing equals transformers' PIL CLIPImageProcessor, save/load round trips (ours and
OpenAI/LAION-style folders), pooling at the end-of-text token, contrastive training, one-line load errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import BertConfig, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from pipeline.models.bpe import train_tokenizer
from pipeline.models.clip import EOS, ClipConfig, build_clip, load_clip

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
CAPTIONS = [
    f"a {s} {c} {shape} on the {p}"
    for s in ("small", "large")
    for c in COLORS
    for shape in ("circle", "square", "triangle")
    for p in ("left", "right", "top")
] * 2
CFG = ClipConfig(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=4,
    text_len=16,
    embed_dim=16,
)


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(CAPTIONS, vocab_size=300)


@pytest.fixture(scope="module")
def clip(bpe):
    return build_clip(CFG, bpe).eval()


@torch.no_grad()
def embed(clip, images, captions):
    tokens = clip.tokenize(captions)
    return clip.image_embeddings(clip.preprocess(images)), clip.text_embeddings(**tokens), tokens


def test_preprocess_matches_hf_clip_image_processor(clip, tmp_path):
    images = random_images([(40, 30), (30, 50), (64, 64), (33, 97), (32, 32), (101, 45)])
    images.append(Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53, 4), dtype=np.uint8), "RGBA"))
    images.append(images[0].convert("L"))
    reference = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = reference(images=images, return_tensors="pt")["pixel_values"]
    got = clip.preprocess(images)
    assert got.shape == (len(images), 3, 32, 32) and got.dtype == torch.float32
    # Same PIL resize, same crop offsets, same float64->float32 rescale order: equal to the last bit.
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The preprocessor config we save reads back into the HF processor with the same result.
    clip.save(str(tmp_path))
    saved = CLIPImageProcessorPil.from_pretrained(str(tmp_path))
    torch.testing.assert_close(saved(images=images, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)


def test_preprocess_accepts_uint8_batches(clip):
    array = np.random.default_rng(2).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
    torch.testing.assert_close(clip.preprocess(array), clip.preprocess([Image.fromarray(a) for a in array]))
    with pytest.raises(ValueError, match="uint8"):
        clip.preprocess(array.astype(np.float32))


def test_build_is_seeded_and_leaves_global_rng_alone(bpe):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_clip(CFG, bpe, seed=5), build_clip(CFG, bpe, seed=5)
    assert torch.equal(torch.rand(1), before)
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = build_clip(CFG, bpe, seed=6)
    assert not torch.equal(a.model.text_projection.weight, c.model.text_projection.weight)


@pytest.mark.parametrize("url", ["local", "memory://clip-tests/model"])
def test_save_load_round_trip(clip, tmp_path, url):
    url = str(tmp_path / "clip") if url == "local" else url
    clip.save(url)
    loaded = load_clip(url)
    assert (loaded.image_size, loaded.text_len, loaded.mean, loaded.std) == (32, 16, clip.mean, clip.std)
    assert loaded.model.config.text_config.eos_token_id == clip.tokenizer.convert_tokens_to_ids(EOS) != 2
    images, captions = random_images([(40, 30), (30, 50), (64, 64)]), CAPTIONS[:3]
    img_a, txt_a, tok_a = embed(clip, images, captions)
    img_b, txt_b, tok_b = embed(loaded, images, captions)
    assert torch.equal(tok_a["input_ids"], tok_b["input_ids"])
    assert torch.equal(tok_a["attention_mask"], tok_b["attention_mask"])
    torch.testing.assert_close(img_a, img_b)
    torch.testing.assert_close(txt_a, txt_b)


def write_openai_style_folder(folder, legacy: bool) -> None:
    """A tiny CLIP saved the way OpenAI/LAION folders are: HF model, CLIP BPE vocab/merges, image processor."""
    alphabet = sorted(ByteLevel.alphabet())
    merges = [
        "r e",
        "re d</w>",
        "c i",
        "ci r",
        "cir c",
        "circ l",
        "circl e</w>",
        "s q",
        "sq u",
        "squ a",
        "squa r",
        "squar e</w>",
    ]
    vocab = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last, so the legacy argmax pooling finds the end token
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 16, "projection_dim": 16}
    text |= {"bos_token_id": len(vocab) - 2, "eos_token_id": 2, "pad_token_id": 1}  # as OpenAI's config.json
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    vision |= {"image_size": 32, "patch_size": 8, "projection_dim": 16}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    if legacy:  # openai/clip-vit-base-patch32: bare-int sizes, feature-extractor era, no tokenizer.json
        pre = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 32, "crop_size": 32, "resample": 3}
        pre |= {"do_resize": True, "do_center_crop": True, "do_normalize": True}
        pre |= {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    else:
        CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor.save_pretrained(folder)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_openai_style_folder_matches_hf(tmp_path, legacy):
    folder = tmp_path / "openai"
    write_openai_style_folder(folder, legacy)
    clip = load_clip(str(folder))
    assert (clip.image_size, clip.text_len) == (32, 16)
    images = random_images([(40, 30), (30, 50), (64, 64)])
    captions = ["A red circle", "a square!", "red red red red red red red red red red red red red red red red"]
    ours_img, ours_txt, tokens = embed(clip, images, captions)

    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    pixels = CLIPImageProcessorPil.from_pretrained(str(folder))(images=images, return_tensors="pt")["pixel_values"]
    hf_tokens = tokenizer(captions, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hf_img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        hf_txt = F.normalize(model.get_text_features(**hf_tokens).pooler_output, dim=-1)
    assert torch.equal(tokens["input_ids"], hf_tokens["input_ids"])
    assert tokens["input_ids"][2, -1] == tokenizer.eos_token_id  # truncated caption still ends with the end token
    torch.testing.assert_close(clip.preprocess(images), pixels, atol=0, rtol=0)
    torch.testing.assert_close(ours_img, hf_img)
    torch.testing.assert_close(ours_txt, hf_txt)


def test_embeddings_are_unit_and_similarity_is_the_dot_product(clip):
    img, txt, _ = embed(clip, random_images([(40, 30), (30, 50), (64, 64), (20, 80)]), CAPTIONS[:4])
    assert img.shape == txt.shape == (4, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(clip.similarity(img, txt), (img @ txt.T).diagonal())


@torch.no_grad()
def test_text_pooling_reads_the_end_token(clip):
    eos = clip.tokenizer.convert_tokens_to_ids(EOS)
    tokens = clip.tokenize(["a small red circle on the left", "a small red circle on the right", "red " * 40])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    lengths = mask.sum(dim=1)
    assert ids.shape == (3, 16) and lengths[2] == 16
    assert all(ids[i, lengths[i] - 1] == eos for i in range(3)) and (ids == eos).sum() == 3
    emb = clip.text_embeddings(ids, mask)
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)  # only the last word differs
    # Whatever sits in the padding (after the end token) does not reach the pooled feature.
    junk = ids.clone()
    junk[mask == 0] = torch.randint(3, eos - 2, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip.text_embeddings(junk, mask), emb)


@torch.no_grad()
def test_bf16_autocast_gives_float32_unit_embeddings(clip):
    images, captions = random_images([(40, 30), (30, 50)]), CAPTIONS[:2]
    img, txt, tokens = embed(clip, images, captions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img16, txt16, _ = embed(clip, images, captions)
        loss = clip.contrastive_loss(clip.preprocess(images), tokens["input_ids"], tokens["attention_mask"])
    assert img16.dtype == txt16.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(img16, img, atol=0.02, rtol=0)
    torch.testing.assert_close(txt16, txt, atol=0.02, rtol=0)


def synthetic_pairs():
    images, captions = [], []
    for name, rgb in COLORS.items():
        for j, side in enumerate(("left", "right")):
            a = np.full((32, 32, 3), 128, np.uint8)
            a[8:24, (2 if j == 0 else 18) : (14 if j == 0 else 30)] = rgb
            images.append(Image.fromarray(a))
            captions.append(f"a {name} square on the {side}")
    return images, captions


def test_contrastive_training_reduces_the_loss(bpe):
    clip = build_clip(CFG, bpe, seed=1).train()
    images, captions = synthetic_pairs()
    pixels, tokens = clip.preprocess(images), clip.tokenize(captions)
    opt = torch.optim.AdamW(clip.model.parameters(), lr=5e-4)
    losses = []
    for _ in range(15):
        loss = clip.contrastive_loss(pixels, tokens["input_ids"], tokens["attention_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < np.log(8), losses


def test_load_errors_are_one_line_and_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(bert)
    no_tokenizer = tmp_path / "no_tokenizer"
    CLIPConfig().save_pretrained(no_tokenizer)
    for folder, what in [
        (missing, "no such folder"),
        (empty, "config.json"),
        (bert, "'bert'"),
        (no_tokenizer, "token"),
    ]:
        with pytest.raises(ValueError) as err:
            load_clip(str(folder))
        message = str(err.value)
        assert str(folder) in message and what in message and "\n" not in message, message
    with pytest.raises(ValueError, match="memory://clip-tests/nothing"):
        load_clip("memory://clip-tests/nothing")
