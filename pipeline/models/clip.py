"""CLIP (transformers' `CLIPModel`) for scoring image-caption pairs: load OpenAI/LAION CLIP from a local
HF-format folder, or build a fresh one of a `ClipConfig`'s sizes to train; preprocessing without torchvision.

Preprocessing reproduces transformers' (PIL) `CLIPImageProcessor`: RGB (alpha over white), bicubic resize of
the shorter side, center crop, scale to [0, 1], normalise. A trained CLIP uses our BPE tokenizer with added
`<|startoftext|>`/`<|endoftext|>` tokens; the text tower pools at the first `<|endoftext|>`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, processors
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, PreTrainedTokenizerFast

from pipeline import storage

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"
PREPROCESSOR = "preprocessor_config.json"


@dataclass(frozen=True)
class ClipConfig:
    """Sizes of a CLIP to train; the defaults are ViT-B/32's."""

    image_size: int = 224
    """Input side of the vision tower."""
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_len: int = 77
    """Text context length."""
    embed_dim: int = 512
    """Joint embedding width."""


class Clip:
    """A `CLIPModel` with its tokenizer and image preprocessing."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        image_size: int,
        mean: Sequence[float] = OPENAI_MEAN,
        std: Sequence[float] = OPENAI_STD,
        text_len: int = 77,
        resize_size: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.text_len = text_len
        # Shorter side before the crop; equal to image_size for every OpenAI/LAION CLIP we know of.
        self.resize_size = resize_size or image_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> Clip:
        self.model.to(device)
        return self

    def eval(self) -> Clip:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> Clip:
        self.model.train(mode)
        return self

    def preprocess(self, images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
        """Images (PIL list, or uint8 [B,H,W,3]) → normalised float32 [B,3,S,S]."""
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(f"expected a uint8 array [B,H,W,3], got {images.dtype} {images.shape}")
            images = [Image.fromarray(a) for a in images]
        pixels = np.zeros((len(images), self.image_size, self.image_size, 3), np.float32)
        for i, image in enumerate(images):
            # float64 then float32, in the order transformers rescales, so results match it bit for bit.
            pixels[i] = (self._resize_crop(image).astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    def _resize_crop(self, image: Image.Image) -> np.ndarray:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        image = image.convert("RGB")
        w, h = image.size
        s = self.resize_size
        # Same truncation as transformers' get_resize_output_image_size (torchvision's Resize(int)).
        size = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        arr = np.asarray(image.resize(size, resample=Image.Resampling.BICUBIC))
        top, left = (size[1] - self.image_size) // 2, (size[0] - self.image_size) // 2
        return arr[top : top + self.image_size, left : left + self.image_size]

    def tokenize(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Ids and mask padded/truncated to `text_len`; truncation keeps the end-of-text token last."""
        enc = self.tokenizer(
            list(captions), padding="max_length", max_length=self.text_len, truncation=True, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _ids(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def _pixels(self, tensor: torch.Tensor) -> torch.Tensor:
        # The model's dtype, so a model cast to bf16 also accepts float32 pixels from `preprocess`.
        return tensor.to(self.device, self.model.dtype)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings [B, D]."""
        out = self.model.get_image_features(pixel_values=self._pixels(pixel_values))
        return _normalised(out)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised float32 text embeddings [B, D]."""
        mask = None if attention_mask is None else self._ids(attention_mask)
        return _normalised(self.model.get_text_features(input_ids=self._ids(input_ids), attention_mask=mask))

    @staticmethod
    def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Row-wise cosine of unit embeddings [B]."""
        return (image_emb * text_emb).sum(dim=-1)

    def contrastive_loss(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Symmetric InfoNCE over the batch, scaled by the model's learned logit scale."""
        out = self.model(
            input_ids=self._ids(input_ids),
            attention_mask=self._ids(attention_mask),
            pixel_values=self._pixels(pixel_values),
            return_loss=True,
        )
        return out.loss

    def save(self, url: str) -> None:
        """Writes a HF folder (safetensors, tokenizer, preprocessor config) that `load_clip` and HF can read."""
        with storage.local_staging(url) as folder:
            self._save_local(folder)

    def _save_local(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with _quiet_transformers():
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        # What transformers' CLIPImageProcessor reads (and `preprocess` does): resize, crop, rescale, normalise.
        steps = dict.fromkeys(("do_convert_rgb", "do_resize", "do_center_crop", "do_rescale", "do_normalize"), True)
        preprocessor = {
            "image_processor_type": "CLIPImageProcessor",
            **steps,
            "resample": int(Image.Resampling.BICUBIC),
        }
        preprocessor |= {"size": {"shortest_edge": self.resize_size}, "rescale_factor": 1 / 255}
        preprocessor |= {"crop_size": {"height": self.image_size, "width": self.image_size}}
        preprocessor |= {"image_mean": list(self.mean), "image_std": list(self.std)}
        with open(os.path.join(folder, PREPROCESSOR), "w") as f:
            json.dump(preprocessor, f, indent=2)


def _normalised(out: torch.Tensor | transformers.utils.ModelOutput) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor.
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats.float(), dim=-1)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences expected warnings (unused position_ids keys, tokenizer notes) and per-shard progress bars."""
    level, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.logging.enable_progress_bar()


def load_clip(path: str) -> Clip:
    """Loads a CLIP from a HF-format folder (OpenAI's, LAION's, or one `Clip.save` wrote); fsspec URLs too."""
    if not storage.is_local(path) and not storage.exists(path):
        raise ValueError(f"CLIP weights {path}: no such folder")
    with storage.local_copy(path) as folder:
        return _load_local(folder, path)


def _load_local(folder: str, shown: str) -> Clip:
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(folder, name))

    if not os.path.isdir(folder):
        raise ValueError(f"CLIP weights {shown}: no such folder")
    if not has("config.json"):
        raise ValueError(f"CLIP weights {shown}: no config.json (not a Hugging Face model folder)")
    try:
        model_type = _read_json(os.path.join(folder, "config.json")).get("model_type")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"CLIP weights {shown}: unreadable config.json ({type(e).__name__})") from None
    if model_type != "clip":
        raise ValueError(f"CLIP weights {shown}: config.json describes a {model_type!r} model, not 'clip'")
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise ValueError(f"CLIP weights {shown}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt)")
    with _quiet_transformers():
        model = CLIPModel.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    vision_size = model.config.vision_config.image_size
    image_size, resize_size, mean, std = vision_size, vision_size, OPENAI_MEAN, OPENAI_STD
    if has(PREPROCESSOR):
        pre = _read_json(os.path.join(folder, PREPROCESSOR))
        size, crop = pre.get("size", vision_size), pre.get("crop_size", vision_size)
        # Old (OpenAI) configs store bare ints; newer ones {"shortest_edge": n} and {"height": h, "width": w}.
        resize_size = size if isinstance(size, int) else size.get("shortest_edge", size.get("height", vision_size))
        image_size = crop if isinstance(crop, int) else crop.get("height", vision_size)
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    if image_size != vision_size or resize_size < image_size:
        raise ValueError(
            f"CLIP weights {shown}: preprocessor crops {image_size} after resizing to {resize_size}, "
            f"but the vision tower reads {vision_size}"
        )
    text_len = model.config.text_config.max_position_embeddings
    log.info("loaded CLIP from %s (image %d, text %d, embed %d)", shown, image_size, text_len, model.projection_dim)
    return Clip(model.eval(), tokenizer, image_size, mean, std, text_len, resize_size)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def build_clip(cfg: ClipConfig, tokenizer: Tokenizer, seed: int = 0) -> Clip:
    """A freshly initialised CLIP of `cfg`'s sizes that reads captions with our BPE `tokenizer`."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    if tok.token_to_id(PAD) is None:
        raise ValueError(f"text tokenizer has no {PAD} token")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    bos_id, eos_id, pad_id = tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD)
    # transformers pools at argmax(input_ids) when eos_token_id == 2 (legacy OpenAI configs): avoid that id.
    if eos_id == 2:
        raise ValueError(f"{EOS} got id 2, which CLIPTextTransformer treats as the legacy argmax pooling")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, bos_id), (EOS, eos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=cfg.text_len
    )
    text = _tower(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.embed_dim)
    text |= {"vocab_size": len(wrapped), "max_position_embeddings": cfg.text_len}
    text |= {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    vision = _tower(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.embed_dim)
    vision |= {"image_size": cfg.image_size, "patch_size": cfg.patch_size}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim)
    # A private RNG stream: the same seed gives the same weights without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    return Clip(model, wrapped, cfg.image_size, OPENAI_MEAN, OPENAI_STD, cfg.text_len)


def _tower(width: int, layers: int, heads: int, embed_dim: int) -> dict:
    tower = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers}
    return tower | {"num_attention_heads": heads, "projection_dim": embed_dim}
