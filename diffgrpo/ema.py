"""An exponential moving average (EMA) of the trained weights, checkpointed and swappable for evaluation.

Why: a GRPO update moves the policy by a noisy estimate of the gradient; the average of the last
~1 / (1 - decay) policies is smoother than any single one, so evaluating (or shipping) the average
often scores better and varies less between checkpoints. Only the trainable parameters are
averaged (the LoRA adapters when training LoRA), so the average costs as much memory as they do.

Update after each iteration's policy update (``diffgrpo.trainer``):
    theta_ema <- decay * theta_ema + (1 - decay) * theta          (computed in float32)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn


class ParameterEMA:
    """The moving average of ``model``'s trainable parameters (by name), in float32 on their device."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must be in [0, 1)")
        self.decay = decay
        self.num_updates = 0
        module = extract_model_from_parallel(model, keep_torch_compile=False)  # names without DDP's 'module.'
        self.shadow: dict[str, Tensor] = {name: p.detach().float().clone()
                                          for name, p in module.named_parameters() if p.requires_grad}
        if not self.shadow:
            raise ValueError("the model has no trainable parameter to average")

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters."""
        params = dict(extract_model_from_parallel(model, keep_torch_compile=False).named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    def state_tensors(self) -> dict[str, Tensor]:
        """{parameter name: averaged value}, for a checkpoint's shared tensors."""
        return dict(self.shadow)

    def load_state_tensors(self, tensors: dict[str, Tensor], num_updates: int) -> None:
        """Restore from :meth:`state_tensors`; raises naming missing or unexpected parameters."""
        missing, unexpected = sorted(set(self.shadow) - set(tensors)), sorted(set(tensors) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model's trainable parameters (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); resume with the same --lora / --grpo.ema settings")
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[name].to(shadow.device))
        self.num_updates = num_updates

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the averaged weights; its own are restored bit-exactly after."""
        params = dict(extract_model_from_parallel(model, keep_torch_compile=False).named_parameters())
        saved = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                params[name].copy_(shadow.to(params[name].dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)

