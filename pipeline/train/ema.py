"""Exponential moving average of a model's weights (the paper keeps one for the dVAE and the
transformer); kept in float32 whatever the training precision."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if value.dtype.is_floating_point:
                shadow.lerp_(value.detach().float(), 1.0 - self.decay)
            else:  # counters, buffers of ints: follow the model
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (keys {sorted(missing)[:3]}...)")
        self.shadow = {k: v.float().to(self.shadow[k].device).clone() for k, v in state.items()}
