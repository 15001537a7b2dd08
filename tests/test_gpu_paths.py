"""The GPU paths against the CPU reference: compiled blocks (FlexAttention on a GPU, SDPA on CPU)
compute the eager loss and gradients, and the encode actor's bf16 pass on a GPU gives the fp32
CPU pass's tokens and embeddings. The CPU cases run everywhere and keep each test honest; the
`gpu` ones run in benchmarks/gpu_suite.py."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from test_transformer import TINY, batch

from pipeline.models.bpe import TextTokenizer, train_tokenizer
from pipeline.models.clip import ClipConfig, build_clip
from pipeline.models.dvae import DVAE, DVAEConfig, map_pixels
from pipeline.models.transformer import Dalle
from pipeline.stages.encode_shard import Encoders

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, cuda])]


def _loss_and_grads(model: Dalle, text: torch.Tensor, image: torch.Tensor):
    loss, _ = model.loss(text, image)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_blocks_give_the_eager_loss_and_gradients(device):
    torch.manual_seed(0)
    eager = Dalle(dataclasses.replace(TINY, attention="auto")).to(device)
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.compile()
    text, image = (t.to(device) for t in batch(TINY))
    loss_eager, grads_eager = _loss_and_grads(eager, text, image)
    loss_compiled, grads_compiled = _loss_and_grads(compiled, text, image)
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-4, rtol=1e-4)
    assert grads_compiled.keys() == grads_eager.keys()
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def _encoders(device: str, dtype: torch.dtype | None) -> Encoders:
    captions = ["a red circle", "a small blue square at the top", "a large green star"] * 4
    bpe = train_tokenizer(captions, vocab_size=128, min_frequency=1)
    torch.manual_seed(0)
    dvae = DVAE(DVAEConfig(image_size=32, group_count=2, vocab_size=64, n_hid=16, n_blk_per_group=1, n_init=16))
    clip = build_clip(
        ClipConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                   text_width=32, text_layers=1, text_heads=2, text_len=16, embed_dim=32),
        bpe,
    )  # fmt: skip
    models = (dvae.to(device).eval(), clip.to(device).eval())
    return Encoders(*models, TextTokenizer(bpe, 16), torch.device(device), dtype, batch_size=8)


@pytest.mark.parametrize("device", DEVICES)
def test_the_encode_pass_on_the_device_agrees_with_fp32_on_cpu(device):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
    reference = _encoders("cpu", None)
    tested = _encoders(device, torch.bfloat16 if device == "cuda" else None)
    tokens_ref, embeds_ref = reference.images(images)
    tokens, embeds = tested.images(images)
    with torch.no_grad():  # positions whose fp32 winner leads clearly must keep it in bf16
        logits = reference.dvae.encoder(map_pixels(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
        top2 = logits.float().topk(2, dim=1).values
        clear = ((top2[:, 0] - top2[:, 1]) > 0.05).flatten(1).numpy()
    assert clear.mean() > 0.5  # the check below covers most positions
    assert (tokens[clear] == tokens_ref[clear]).mean() >= 0.99
    cosine = (embeds * embeds_ref).sum(1) / np.linalg.norm(embeds, axis=1) / np.linalg.norm(embeds_ref, axis=1)
    assert cosine.min() > 0.99
    text_ref, text = reference.captions(["a red circle"] * 3), tested.captions(["a red circle"] * 3)
    assert np.allclose(text, text_ref, atol=0.05)
