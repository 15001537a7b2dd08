"""uint8 image arrays to and from float tensors (the model side of `images`)."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: list[np.ndarray] | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 BxHxWx3 -> float32 Bx3xHxW in [0, 1], on `device` (the uint8 bytes cross to it,
    a quarter of the float32 ones, and the conversion runs there)."""
    array = np.stack(images) if isinstance(images, list) else images
    x = torch.from_numpy(array)
    if device is not None:
        x = x.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float Bx3xHxW in [0, 1] -> uint8 BxHxWx3."""
    return (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
