"""Text to images: sample image tokens from the transformer, decode them with the dVAE, rerank with CLIP.

`ImageGenerator.generate(prompt, n, top)` draws `n` candidates for a prompt in batches (KV-cached decoding,
`pipeline.models.sampling`), decodes them to pixels, scores each against the prompt with CLIP (cosine of the
unit embeddings) and keeps the `top` best, best first: the paper's 512 -> 32 reranking. `complete` does the
same with the top rows of a given image's tokens kept. A prompt's candidates depend only on (seed, prompt,
batch size), not on the worker or what ran before, so reruns and resumed stages give the same images.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import storage
from pipeline.data.image_tensors import to_tensor, to_uint8
from pipeline.models.layout import MODELS_FILE
from pipeline.models.sampling import free_memory, kv_batch_size, sample_image_tokens


@dataclass(frozen=True)
class SamplingConfig:
    """How candidates are drawn."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    batch_size: int | None = None
    """Candidates decoded together; None: as many as the KV cache fits in the device's free memory. The
    images do not depend on it (each candidate draws from its own seed)."""
    seed: int = 0
    guidance: float = 1.0
    """Classifier-free guidance scale: each candidate also runs unconditioned (empty caption) and draws
    from `uncond + guidance * (cond - uncond)`; 1 draws unguided (and runs no second stream)."""

    @property
    def guidance_scale(self) -> float | None:
        """The scale `sample_image_tokens` takes: None when guidance changes nothing."""
        return None if self.guidance == 1.0 else self.guidance


@dataclass(frozen=True)
class Generation:
    """Every candidate of one prompt, in draw order, and the reranking."""

    prompt: str
    tokens: np.ndarray
    """Image tokens [n, grid*grid]."""
    images: np.ndarray
    """uint8 [n, H, W, 3]."""
    scores: np.ndarray
    """CLIP cosine similarity of each candidate with the prompt [n]."""
    order: np.ndarray
    """Candidate indices by descending score (ties keep draw order)."""

    def best(self, top: int) -> np.ndarray:
        """Indices of the `top` best candidates, best first."""
        return self.order[:top]


def rerank(scores: np.ndarray) -> np.ndarray:
    """Indices ordering `scores` from highest to lowest; equal scores keep their order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def candidate_seed(seed: int, prompt: str, index: int) -> int:
    """The generator seed of one candidate: stable across processes (unlike `hash`)."""
    digest = hashlib.sha256(f"{seed}\0{prompt}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ImageGenerator:
    """The transformer, dVAE, CLIP and text tokenizer of one trained model, on one device."""

    def __init__(self, dalle, dvae, clip, tokenizer, device: torch.device, dtype: torch.dtype | None = None):
        self.dalle, self.dvae, self.clip, self.tokenizer = dalle, dvae, clip, tokenizer
        self.device, self.dtype = device, dtype
        if self.dvae.grid**2 != self.dalle.cfg.image_len or self.dvae.vocab_size != self.dalle.cfg.image_vocab:
            raise ValueError(
                f"the dVAE ({self.dvae.grid}x{self.dvae.grid} tokens, vocabulary {self.dvae.vocab_size}) does not "
                f"match the transformer ({self.dalle.cfg.image_len} tokens, vocabulary {self.dalle.cfg.image_vocab})"
            )

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dvae: str | None = None,
        clip: str | None = None,
        tokenizer: str | None = None,
        device: str = "auto",
        precision: str = "auto",
    ) -> ImageGenerator:
        """Loads the transformer folder `model` (safetensors weights + config.json) and its companions: the URLs in its
        `models.json` unless given. `device` auto is CUDA when present; `precision` auto is bf16 there."""
        from pipeline.models.bpe import TextTokenizer
        from pipeline.models.clip import load_clip
        from pipeline.models.dvae import load_dvae
        from pipeline.models.transformer import load_dalle

        url = storage.absolute(model)
        known = storage.read_json_or_none(storage.join(url, MODELS_FILE)) or {}
        paths = {"dvae": dvae, "clip": clip, "tokenizer": tokenizer}
        for key, value in paths.items():
            if value is None:
                if key not in known:
                    raise FileNotFoundError(f"{model}: no {MODELS_FILE} naming the {key}; pass --{key}")
                paths[key] = known[key]
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu"))
        if precision == "auto":
            precision = "bf16" if dev.type == "cuda" else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        dalle = load_dalle(url, dev, dtype or torch.float32)
        text = TextTokenizer.load(paths["tokenizer"], dalle.cfg.text_len)
        return cls(
            dalle, load_dvae(paths["dvae"]).to(dev).eval(), load_clip(paths["clip"]).to(dev).eval(), text, dev, dtype
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()

    def text_ids(self, prompt: str, count: int) -> torch.Tensor:
        """The prompt's token ids [count, text_len] (lowercased by the tokenizer, as in training)."""
        ids = torch.from_numpy(self.tokenizer.encode(prompt).astype(np.int64))
        return ids.expand(count, -1).contiguous()

    def batch_size(self, cfg: SamplingConfig) -> int:
        """`cfg.batch_size`, or the candidates whose KV caches (two streams each when guided) fit in the
        device's free memory now."""
        if cfg.batch_size is not None:
            return cfg.batch_size
        dtype = next(self.dalle.parameters()).dtype
        streams = 1 if cfg.guidance_scale is None else 2
        return max(1, kv_batch_size(self.dalle.cfg, dtype, free_memory(self.device)) // streams)

    def sample(self, prompt: str, n: int, cfg: SamplingConfig, prefix: np.ndarray | None = None) -> np.ndarray:
        """`n` candidates' image tokens [n, grid*grid] (`prefix` [P]: the first P tokens of every one);
        candidate i draws from `candidate_seed(cfg.seed, prompt, i)`."""
        out = []
        size = self.batch_size(cfg)
        for start in range(0, n, size):
            count = min(size, n - start)
            given = None if prefix is None else torch.as_tensor(prefix, dtype=torch.long).expand(count, -1)
            tokens = sample_image_tokens(
                self.dalle,
                self.text_ids(prompt, count).to(self.device),
                seeds=[candidate_seed(cfg.seed, prompt, i) for i in range(start, start + count)],
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                prefix=given,
                guidance=cfg.guidance_scale,
            )
            out.append(tokens.cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def decode(self, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """uint8 images [n, H, W, 3] from image tokens [n, grid*grid]."""
        out = []
        for start in range(0, len(tokens), batch_size):
            chunk = torch.as_tensor(tokens[start : start + batch_size], dtype=torch.long, device=self.device)
            with self._autocast():
                out.append(to_uint8(self.dvae.decode(chunk).float()))
        return np.concatenate(out)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """The dVAE's tokens [n, grid*grid] of uint8 images [n, S, S, 3] (S = the dVAE's image size)."""
        with self._autocast():
            return self.dvae.tokens(to_tensor(images, self.device)).cpu().numpy()

    @torch.no_grad()
    def scores(self, images: np.ndarray, prompt: str, batch_size: int = 64) -> np.ndarray:
        """CLIP cosine similarity of each image with the prompt [n]."""
        tokens = self.clip.tokenize([prompt])
        with self._autocast():
            text = self.clip.text_embeddings(tokens["input_ids"], tokens["attention_mask"]).float()
            out = []
            for start in range(0, len(images), batch_size):
                pixels = self.clip.preprocess(images[start : start + batch_size])
                out.append((self.clip.image_embeddings(pixels).float() @ text.T).squeeze(1).cpu())
        return torch.cat(out).numpy()

    def generate(self, prompt: str, n: int, cfg: SamplingConfig, prefix: np.ndarray | None = None) -> Generation:
        """`n` candidates for `prompt`, decoded and reranked by CLIP."""
        tokens = self.sample(prompt, n, cfg, prefix)
        images = self.decode(tokens)
        scores = self.scores(images, prompt)
        return Generation(prompt, tokens, images, scores, rerank(scores))

    def complete(self, image: np.ndarray, prompt: str, rows: int, n: int, cfg: SamplingConfig) -> Generation:
        """Image completion: keep the top `rows` token rows of `image` (uint8 [S, S, 3]) and sample the rest."""
        grid = self.dvae.grid
        if not 0 <= rows <= grid:
            raise ValueError(f"rows must be between 0 and {grid} (the token grid), got {rows}")
        prefix = self.encode(image[None])[0, : rows * grid]
        return self.generate(prompt, n, cfg, prefix)
