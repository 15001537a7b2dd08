"""Recipe sections of the model stages (dvae, clip, encode) and the trainer settings they share.

Defaults are the paper's (dVAE) and ViT-B/32's (CLIP); the demo recipe shrinks them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config.base import Config


class TrainConfig(Config):
    """Trainer plumbing shared by every trained model: Ray Train workers, DeepSpeed, optimiser,
    schedule, EMA, checkpoints, tracking."""

    execution_only = frozenset({"workers", "keep_checkpoints", "max_failures", "log_every", "wandb_project", "compile"})

    workers: int = Field(2, ge=1, le=4096)
    """Ray Train workers (one process each; one GPU each when `use_gpu`). A run keeps the updates it
    started with (workers x batch_size x grad_accum samples): resumed on another count that divides
    its workers x grad_accum micro-batches, each worker takes an equal share of every update."""
    use_gpu: bool | None = None
    """True trains on GPUs (one per worker, NCCL, `precision`); false or null (unset) on CPUs
    (gloo, fp32). The recipe decides, never the cluster of the moment: on a cluster without the
    GPUs the run waits for its autoscaler (`ray.gpu_wait_s`), and a Ray that can never have them
    refuses in one line. Part of the fingerprint: it changes the run's arithmetic and its
    checkpoints' format. (Null meant "GPUs when the cluster has them" in older releases; it stays
    the default, now meaning CPUs, so that the fingerprints they wrote for CPU runs still match.)"""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs each worker asks Ray for."""
    steps: int = Field(100_000, ge=1)
    """Optimiser updates in total."""
    batch_size: int = Field(64, ge=1)
    """Samples per worker per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimiser update (global batch = workers x batch_size x grad_accum)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up updates before the cosine decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW decoupled weight decay."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the gradient norm to this; null does not clip."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training precision on GPU (fp16 uses dynamic loss scaling); CPU training always runs fp32."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage: 1 partitions the optimizer states over the workers, 2 also the
    gradients, 3 also the parameters."""
    offload_optimizer: bool = False
    """Keep the optimizer states (and the step) on CPU memory (ZeRO-Offload; zero_stage >= 1)."""
    offload_params: bool = False
    """Keep the parameters on CPU memory between uses (ZeRO-Infinity; zero_stage 3)."""
    hpz_partition_size: int = Field(1, ge=1)
    """ZeRO++ hpZ (zero_stage 3): keep a second copy of the 16-bit weights sharded over this many
    GPUs (a node's: 8) so the backward all-gather stays inside the node. 1: off."""
    quantized_weights: bool = False
    """ZeRO++ qwZ (zero_stage 3): all-gather the weights as int8 (half the traffic of bf16)."""
    quantized_gradients: bool = False
    """ZeRO++ qgZ (zero_stage 3): reduce-scatter the gradients as int4."""
    compile: Literal["auto", "on", "off"] = "auto"
    """`torch.compile` the model's repeated blocks (the transformer's layers; models without any
    are left as they are): auto compiles on GPUs, where it pays (fused kernels; the first steps
    wait for the compiler), and not on CPUs."""
    loader_workers: int = Field(0, ge=0, le=64)
    """Data-loader processes per worker decoding samples (0 decodes in the training process);
    the sample order does not depend on it."""
    log_sample_keys: bool = False
    """Record the key of every sample each rank trains on, per checkpoint interval, under
    `_train/sample_keys/` (to audit the data order across restarts)."""
    ema_decay: float | None = Field(0.999, ge=0, lt=1)
    """Decay of the exponential moving average of the weights (saved and exported); null: none."""
    checkpoint_every: int = Field(1000, ge=1)
    """Updates between checkpoints (and one at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept in storage (older ones are deleted)."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the last checkpoint before the run fails (-1: unlimited)."""
    log_every: int = Field(10, ge=1)
    """Updates between metric reports."""
    seed: int = 0
    """Seed of the initialisation, the data order and the per-step noise."""
    deepspeed: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged over the generated config (expert use)."""
    wandb_project: str | None = None
    """W&B project; null logs offline under the stage folder (`wandb sync` uploads later)."""

    @model_validator(mode="after")
    def _offload(self) -> TrainConfig:
        if self.offload_optimizer and self.zero_stage < 1:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        zero_pp = self.hpz_partition_size > 1 or self.quantized_weights or self.quantized_gradients
        if zero_pp and self.zero_stage != 3:
            raise ValueError("hpz_partition_size, quantized_weights and quantized_gradients (ZeRO++) need zero_stage 3")
        return self

    @property
    def samples_seen(self) -> int:
        """Samples a full run started on `workers` trains on (updates x global batch)."""
        return self.steps * self.batch_size * self.grad_accum * self.workers


class TransformerTrainConfig(TrainConfig):
    """The trainer settings of the transformer: `TrainConfig`'s and the share of empty captions."""

    added_fields = {"null_caption_prob": 0.0}  # 0: every caption kept, as before the field (b0e93b5)

    null_caption_prob: float = Field(0.0, ge=0, lt=1)
    """Share of training samples whose caption is replaced by the empty (all-padding) caption, drawn
    per sample from (seed, epoch, key), so the model also learns images unconditioned: what
    classifier-free guidance (`sample.guidance`) pushes away from. dalle-mini and DALLE-pytorch use
    0.1-0.2; 0 trains no unconditional model (guidance then has nothing to push from)."""


def _no_zero3(train: TrainConfig, section: str) -> None:
    # the dVAE and CLIP fit on one device many times over, and their tasks evaluate the
    # module directly (HF's CLIP under ZeRO-3 is untested here); ZeRO-3 is for the transformer
    if train.zero_stage == 3:
        raise ValueError(f"{section}.train.zero_stage 3 is not supported for this model; use 0, 1 or 2")


class DVAESection(Config):
    """The discrete VAE that turns images into a grid of tokens (OpenAI `dall_e` architecture)."""

    added_fields = {"gumbel_noise_end": 1.0}  # 1: full noise throughout, as before the field (842c279)

    weights: str | None = None
    """Existing weights to use instead of training: a folder with OpenAI's `encoder.pkl` and
    `decoder.pkl`, or one written by this stage (`dvae.pt`). Null trains a dVAE."""
    image_size: int = Field(256, ge=16, le=2048)
    """Side of the (square) images the dVAE reads."""
    vocab_size: int = Field(8192, ge=2, le=65536)
    """Codebook size K (image tokens are stored as uint16)."""
    n_hid: int = Field(256, ge=4)
    """Width of the first encoder group; group g is 2^(g-1) times wider."""
    n_blk_per_group: int = Field(2, ge=1)
    """Residual blocks per group."""
    group_count: int = Field(4, ge=2, le=8)
    """Groups; each but the last halves the resolution (grid = image_size / 2^(group_count-1))."""
    n_init: int = Field(128, ge=1)
    """Channels of the decoder's first 1x1 convolution."""
    temperature_start: float = Field(1.0, gt=0)
    """Gumbel-softmax temperature at step 0."""
    temperature_end: float = Field(1 / 16, gt=0)
    """Gumbel-softmax temperature after `temperature_steps` (cosine schedule)."""
    temperature_steps: int = Field(150_000, ge=1)
    """Updates over which the temperature anneals."""
    kl_weight: float = Field(6.6, ge=0)
    """Final weight of the KL term against the uniform prior."""
    kl_steps: int = Field(5000, ge=1)
    """Updates over which the KL weight rises from 0 (cosine schedule)."""
    straight_through: bool = False
    """Feed the decoder the one-hot argmax of the Gumbel sample (straight-through gradients) instead
    of the relaxed sample (the paper): it trains on the codes it decodes later. For short runs."""
    gumbel_noise_end: float = Field(1.0, ge=0, le=1)
    """Scale of the Gumbel noise after `temperature_steps` (cosine from 1). Below 1 the sampled
    codes approach the argmax codes the dVAE gives at encode time, so with `straight_through` the
    decoder ends up trained on the codes it will decode. 1: the paper's (full noise throughout)."""
    usage_weight: float = Field(0.0, ge=0)
    """Reward for using the whole codebook: minus this times the normalised entropy of the batch's
    mean code distribution (0 in the paper; short runs collapse onto a few codes without it)."""
    mse_weight: float = Field(0.0, ge=0)
    """Pixel MSE of the reconstruction added to the loss with this weight (0 in the paper); makes
    small objects count against a noisy background in short runs."""
    train: TrainConfig = TrainConfig(
        steps=3_000_000, batch_size=8, lr=1e-4, min_lr=1.25e-6, betas=(0.9, 0.999), weight_decay=1e-4
    )
    """Trainer settings."""
    reconstructions: int = Field(16, ge=0, le=256)
    """Held-out images whose reconstructions are logged and scored at each checkpoint."""

    @model_validator(mode="after")
    def _grid(self) -> DVAESection:
        _no_zero3(self.train, "dvae")
        factor = 2 ** (self.group_count - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^(group_count-1) = {factor}")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** (self.group_count - 1)


class ClipSection(Config):
    """The CLIP used to score image-caption pairs (HF `CLIPModel`)."""

    weights: str | None = None
    """A local (or fsspec) folder holding a CLIP in Hugging Face format (OpenAI's or LAION's, or
    one written by this stage). Null trains one on the filtered pairs."""
    image_size: int = Field(224, ge=16)
    """Input side of the vision tower (trained CLIP only)."""
    patch_size: int = Field(32, ge=2)
    """ViT patch side."""
    vision_width: int = Field(768, ge=8)
    """Vision transformer width."""
    vision_layers: int = Field(12, ge=1)
    """Vision transformer layers."""
    vision_heads: int = Field(12, ge=1)
    """Vision attention heads."""
    text_width: int = Field(512, ge=8)
    """Text transformer width."""
    text_layers: int = Field(12, ge=1)
    """Text transformer layers."""
    text_heads: int = Field(8, ge=1)
    """Text attention heads."""
    text_len: int = Field(77, ge=4)
    """Text context length."""
    embed_dim: int = Field(512, ge=8)
    """Joint embedding width."""
    train: TrainConfig = TrainConfig(steps=10_000, batch_size=256, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98))
    """Trainer settings."""

    @model_validator(mode="after")
    def _shapes(self) -> ClipSection:
        _no_zero3(self.train, "clip")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width {width} is not divisible by {tower}_heads {heads}")
        return self


class EncodeSection(Config):
    """Encode every filtered shard: dVAE tokens, text tokens, CLIP embeddings and similarity."""

    execution_only = frozenset({"actors", "max_task_retries"})

    batch_size: int = Field(256, ge=1)
    """Images per model call."""
    actors: int | None = Field(None, ge=1)
    """Actors in the pool (each holds both models). Null: a pool Ray Data grows from one actor to
    one per shard while the cluster has room. A cluster recipe sizes it (GPU nodes x GPUs each):
    an autoscaling cluster has no GPU node when encode starts, and a sized pool asks for them all."""
    gpus_per_actor: float | None = Field(None, ge=0)
    """GPUs each actor asks Ray for (0.5: two actors share one); 0 or null (unset) encodes on
    CPUs. The recipe decides, never the cluster of the moment: on a cluster without GPUs the stage
    waits for its autoscaler (`ray.gpu_wait_s`), and a Ray that can never have them refuses in one
    line. (Null meant "1 when the cluster has GPUs" in older releases; it stays the default, now
    meaning CPUs, so that the fingerprints they wrote for CPU runs still match.)"""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Inference precision; auto is bf16 on GPU and fp32 on CPU."""
    clip_threshold: float | None = Field(0.28, ge=-1, le=1)
    """Drop pairs whose CLIP image-text cosine similarity is below this (LAION's 0.28 for
    ViT-B/32); null keeps every pair."""
    max_task_retries: int = Field(2, ge=0)
    """Times a failed shard is retried before the stage fails."""


class TransformerSection(Config):
    """The DALL·E transformer over [text tokens | image tokens] and its training (the `train`
    stage). Sizes come from `preset`; the text and image vocabularies and lengths come from the
    encoded shards. Defaults are the paper's 12B model and optimiser."""

    preset: Literal["demo", "small", "1.3b", "12b"] = "12b"
    """Model size: demo (CPU-sized), small (~120M), 1.3b, 12b (64 layers, 62 heads x 64)."""
    layers: int | None = Field(None, ge=1)
    """Overrides the preset's number of layers."""
    heads: int | None = Field(None, ge=1)
    """Overrides the preset's attention heads."""
    head_dim: int | None = Field(None, ge=8)
    """Overrides the preset's width per head."""
    mlp_ratio: int = Field(4, ge=1)
    """MLP width as a multiple of the model width."""
    conv_kernel: int = Field(11, ge=1)
    """Side of the causal convolutional attention window of the last layer (odd)."""
    attention: Literal["auto", "flex", "sdpa"] = "auto"
    """Attention kernel: FlexAttention block masks (auto on CUDA) or SDPA with dense masks (auto on CPU)."""
    checkpoint_activations: bool = False
    """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
    text_loss_weight: float = Field(0.125, ge=0)
    """Weight of the text cross-entropy (the paper: 1/8)."""
    image_loss_weight: float = Field(0.875, ge=0)
    """Weight of the image cross-entropy (the paper: 7/8)."""
    holdout: int = Field(256, ge=0)
    """Encoded samples (the last in shard order) kept out of training to measure held-out loss."""
    eval_batch_size: int = Field(16, ge=1)
    """Samples per forward pass when measuring the held-out loss."""
    export_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Precision of the exported weights (sharded safetensors; bf16 halves a 12B export to 24.6 GB)."""
    train: TransformerTrainConfig = TransformerTrainConfig(
        steps=430_000,
        batch_size=1,
        grad_accum=1,
        lr=4.5e-4,
        min_lr=4.5e-6,
        warmup_steps=5000,
        betas=(0.9, 0.96),
        eps=1e-8,
        weight_decay=4.5e-2,
        grad_clip=4.0,
        zero_stage=2,
        ema_decay=0.9999,
    )
    """Trainer settings (the paper: AdamW (0.9, 0.96), eps 1e-8, wd 4.5e-2, clip 4, lr 4.5e-4
    after 5000 warm-up updates, batch 1024, parameter EMA)."""

    @model_validator(mode="after")
    def _shape(self) -> TransformerSection:
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel {self.conv_kernel} must be odd")
        return self
