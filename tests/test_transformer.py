"""DALL·E transformer: analytic sizes, end-to-end causality, per-position padding, the loss, activation
checkpointing, the sdpa/flex backends and a small overfitting run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import transformer
from pipeline.models.attention import layer_kinds, mean_visible_keys
from pipeline.models.transformer import (
    PRESETS,
    Dalle,
    DalleConfig,
    flops_per_token,
    largest_layer_params,
    param_count,
    preset,
    text_ids,
)

TINY = DalleConfig(
    layers=4, heads=2, head_dim=8, text_len=6, text_vocab=20, image_grid=4, image_vocab=16, conv_kernel=3
)
EMBEDDINGS = ("text_emb", "text_pos", "image_emb", "row_emb", "col_emb")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batch(cfg: DalleConfig, size: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, cfg.text_vocab, (size, cfg.text_len), generator=gen)
    text[:, cfg.text_len // 2 :] = 0  # padded tails
    text[0, -1] = 3  # one row with a token after padding
    image = torch.randint(0, cfg.image_vocab, (size, cfg.image_len), generator=gen)
    return text, image


def model(cfg: DalleConfig = TINY, seed: int = 0) -> Dalle:
    torch.manual_seed(seed)
    return Dalle(cfg)


@pytest.mark.parametrize("cfg", [preset("demo"), TINY, dataclasses.replace(TINY, layers=1, mlp_ratio=2)])
def test_param_count_and_largest_layer_match_the_module(cfg):
    m = Dalle(cfg)
    assert param_count(cfg) == sum(p.numel() for p in m.parameters())
    assert largest_layer_params(cfg) == max(p.numel() for p in m.parameters())


def test_gpt2_initialisation():
    cfg = preset("demo")
    m = Dalle(cfg)
    residual_std = 0.02 / (2 * cfg.layers) ** 0.5
    for name, p in m.named_parameters():
        if name.endswith(("attn.out.weight", "mlp.2.weight")):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(".bias"):
            assert not p.any(), name
        elif name.split(".")[-2].startswith("ln"):  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


def test_flops_per_token_from_the_module():
    m = model()
    non_embedding = sum(p.numel() for name, p in m.named_parameters() if name.split(".")[0] not in EMBEDDINGS)
    attention = sum(12 * TINY.d_model * mean_visible_keys(k, 6, 4, 3) for k in layer_kinds(TINY.layers))
    assert flops_per_token(TINY) == pytest.approx(6 * non_embedding + attention)


def test_preset_sizes():
    big = preset("12b")
    assert (big.layers, big.d_model, big.seq_len) == (64, 3968, 1280)
    assert 11.5e9 < param_count(big) < 12.5e9
    assert 1.2e9 < param_count(preset("1.3b")) < 1.4e9
    assert 0.10e9 < param_count(preset("small")) < 0.14e9
    assert 6 * param_count(big) * 0.9 < flops_per_token(big) < 6 * param_count(big) * 1.1


def test_config_round_trip_and_errors():
    cfg = preset("demo", text_len=64, checkpoint_activations=True)
    assert cfg.text_len == 64 and cfg.layers == PRESETS["demo"]["layers"]
    assert DalleConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="colour"):
        DalleConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="huge.*demo.*12b"):
        preset("huge")
    with pytest.raises(ValueError, match="attention"):
        preset("demo", attention="xformers")


def test_forward_shapes_and_bad_inputs():
    text, image = batch(TINY)
    text_logits, image_logits = model()(text, image)
    assert text_logits.shape == (3, TINY.text_len - 1, TINY.text_vocab + TINY.text_len)
    assert image_logits.shape == (3, TINY.image_len, TINY.image_vocab)
    with pytest.raises(ValueError, match="image"):
        model()(text, image[:, :-1])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_image_tokens_only_affect_later_predictions(backend):
    m = model(dataclasses.replace(TINY, attention=backend)).eval()
    text, image = batch(TINY)
    with torch.no_grad():
        base_text, base_image = m(text, image)
        for j in (0, 5, TINY.image_len - 2):
            changed = image.clone()
            changed[:, j] = (changed[:, j] + 1) % TINY.image_vocab
            new_text, new_image = m(text, changed)
            assert torch.equal(new_text, base_text)
            assert torch.equal(new_image[:, : j + 1], base_image[:, : j + 1])
            assert not torch.allclose(new_image[:, j + 1 :], base_image[:, j + 1 :])


def test_text_tokens_only_affect_later_predictions():
    m = model().eval()
    text, image = batch(TINY)
    with torch.no_grad():
        base_text, base_image = m(text, image)
        t = 2
        changed = text.clone()
        changed[:, t] = 7
        new_text, new_image = m(changed, image)
        # text logit i predicts text token i + 1
        assert torch.equal(new_text[:, :t], base_text[:, :t])
        assert not torch.allclose(new_text[:, t:], base_text[:, t:])
        assert not torch.allclose(new_image, base_image)


def test_text_ids_gives_each_pad_position_its_own_token():
    text = torch.tensor([[5, 0, 9, 0], [0, 0, 0, 0]])
    assert text_ids(text, 100).tolist() == [[5, 101, 9, 103], [100, 101, 102, 103]]


def test_pad_embeddings_depend_on_position():
    m = model()
    image = torch.zeros(2, TINY.image_len, dtype=torch.long)
    # Same tokens, padding in different places.
    text = torch.tensor([[4, 8, 0, 0, 0, 0], [4, 0, 0, 8, 0, 0]])
    with torch.no_grad():
        x = m.embed(text, image)[:, : TINY.text_len] - m.text_pos.weight
    pads = x[1, [1, 2, 4, 5]]
    torch.testing.assert_close(pads, m.text_emb.weight[TINY.text_vocab + torch.tensor([1, 2, 4, 5])])
    assert torch.cdist(pads, pads).add(torch.eye(4)).min() > 1e-3, "two pad positions share an embedding"
    torch.testing.assert_close(x[0, 1], m.text_emb.weight[8])
    torch.testing.assert_close(x[1, 3], m.text_emb.weight[8])
    assert not torch.allclose(x[0, 3], x[1, 3])  # a pad at 3 in one row, the token 8 in the other


def test_image_position_embedding_is_row_plus_column():
    m = model()
    text, image = batch(TINY, size=1)
    with torch.no_grad():
        x = m.embed(text, image)[0, TINY.text_len :]
    grid = TINY.image_grid
    for i in (1, grid, grid + 2, TINY.image_len - 1):  # raster order: (0, 1), (1, 0), (1, 2), (last, last)
        r, c = divmod(i, grid)
        expected = m.image_emb.weight[image[0, i]] + m.row_emb.weight[r] + m.col_emb.weight[c]
        torch.testing.assert_close(x[i], expected)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = logits.double().log_softmax(-1)
    return -log_probs.gather(-1, targets[..., None]).mean()


def test_loss_is_the_weighted_sum_of_cross_entropies():
    cfg = dataclasses.replace(TINY, text_loss_weight=0.3, image_loss_weight=2.0)
    m = model(cfg)
    text, image = batch(cfg)
    loss, parts = m.loss(text, image)
    with torch.no_grad():
        text_logits, image_logits = m(text, image)
    text_ce = _cross_entropy(text_logits, text_ids(text, cfg.text_vocab)[:, 1:])
    image_ce = _cross_entropy(image_logits, image)
    assert float(parts["text_loss"]) == pytest.approx(text_ce.item(), rel=1e-5)
    assert float(parts["image_loss"]) == pytest.approx(image_ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * text_ce.item() + 2.0 * image_ce.item(), rel=1e-5)
    # The predicted pad token at the last text position is a target too.
    assert text_ids(text, cfg.text_vocab)[1, -1] == cfg.text_vocab + cfg.text_len - 1


def _loss_and_grads(m: Dalle, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
    loss, _ = m.loss(text, image)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in m.named_parameters()}


def test_activation_checkpointing_matches(monkeypatch):
    calls = []
    real_checkpoint = transformer.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(transformer, "checkpoint", counting_checkpoint)
    text, image = batch(TINY)
    plain = model()
    ckpt = Dalle(dataclasses.replace(TINY, checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    loss_plain, grads_plain = _loss_and_grads(plain.train(), text, image)
    assert calls == []
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt.train(), text, image)
    assert calls == [False] * TINY.layers
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-7, rtol=1e-6, msg=name)
    with torch.no_grad():
        ckpt.eval().loss(text, image)
    assert len(calls) == TINY.layers  # no checkpointing outside training


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_sdpa_and_flex_give_the_same_loss():
    # Eager flex has no backward on CPU; the gradients are compared on CUDA below.
    text, image = batch(TINY)
    sdpa = model(dataclasses.replace(TINY, attention="sdpa"))
    flex = Dalle(dataclasses.replace(TINY, attention="flex"))
    flex.load_state_dict(sdpa.state_dict())
    with torch.no_grad():
        loss_sdpa, parts_sdpa = sdpa.loss(text, image)
        loss_flex, parts_flex = flex.loss(text, image)
    torch.testing.assert_close(loss_flex, loss_sdpa, atol=1e-5, rtol=1e-5)
    for name, value in parts_sdpa.items():
        torch.testing.assert_close(parts_flex[name], value, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_sdpa_and_flex_give_the_same_gradients_on_cuda():
    text, image = (t.cuda() for t in batch(TINY))
    sdpa = model(dataclasses.replace(TINY, attention="sdpa")).cuda()
    flex = Dalle(dataclasses.replace(TINY, attention="flex")).cuda()
    flex.load_state_dict(sdpa.state_dict())
    loss_sdpa, grads_sdpa = _loss_and_grads(sdpa, text, image)
    loss_flex, grads_flex = _loss_and_grads(flex, text, image)
    torch.testing.assert_close(loss_flex, loss_sdpa, atol=1e-4, rtol=1e-4)
    for name, g in grads_sdpa.items():
        torch.testing.assert_close(grads_flex[name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_overfits_one_batch():
    m = model()
    text, image = batch(TINY, size=4, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first, _ = m.loss(text, image)
    for _ in range(30):
        loss, _ = m.loss(text, image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        loss, parts = m.loss(text, image)
    assert loss.item() < 0.5 * first.item()
    uniform = F.cross_entropy(torch.zeros(1, TINY.image_vocab), torch.tensor([0])).item()
    assert float(parts["image_loss"]) < uniform - 0.5
