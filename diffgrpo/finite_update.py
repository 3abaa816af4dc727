"""Keeping non-finite losses and gradients out of the weights and the optimiser state.

Why before the optimiser step, and why a decision shared by all processes: one infinite gradient
entry becomes NaN in every gradient through the global-norm clip (its norm is infinite, the scale
max_norm / inf times inf is NaN) and then in the weights and both Adam moments, and a checkpoint
would carry it. The check runs after the gradients are complete (after DDP's all-reduce) and before
clipping; whether to step is decided from one all-reduced flag, so every process takes the same
branch and the collectives stay paired. Under fp16 loss scaling (accelerate's ``GradScaler``) the
scaler owns the gradient check: overflowing gradients are expected there, and it skips the step and
lowers the scale itself; the loss is still checked.

Policy (``OptimConfig.on_nonfinite``): 'skip' leaves weights, optimiser moments and the LR schedule
untouched, counts the step (``loss/nonfinite_steps``) and logs a WARNING naming the parameters;
``max_consecutive_nonfinite`` skips in a row stop the run. 'stop' raises at the first one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


class NonFiniteUpdateError(FloatingPointError):
    """An optimiser step's loss or gradient is not finite and the policy says stop."""


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the parameters whose gradient (this process's part of it, under sharding) holds a NaN or an
    infinity, in ``named_parameters`` order."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    local = [g.to_local() if hasattr(g, "to_local") else g for _, g in named]  # FSDP2: DTensor shards
    finite = torch.stack([torch.isfinite(g).all() for g in local]).tolist()  # one host sync
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


@dataclass
class FiniteUpdateGuard:
    """Decides, identically on every process, whether an optimiser step may be taken (module docstring).

    Carried by the run (``consecutive`` and ``skipped`` go into checkpoints), so the limit on skips in a
    row holds across iterations and resumes.
    """

    on_nonfinite: str = "skip"
    """'skip' or 'stop' (``OptimConfig.on_nonfinite``)."""
    max_consecutive: int = 3
    """Skips in a row that stop the run (``OptimConfig.max_consecutive_nonfinite``)."""
    consecutive: int = 0
    """Skipped optimiser steps since the last one taken."""
    skipped: int = 0
    """Skipped optimiser steps over the whole run."""

    @classmethod
    def from_config(cls, optim) -> FiniteUpdateGuard:
        """The guard of an ``OptimConfig``."""
        return cls(on_nonfinite=optim.on_nonfinite, max_consecutive=optim.max_consecutive_nonfinite)

    def allow_step(self, accelerator, model: nn.Module, losses: list[Tensor], *, where: str) -> bool:
        """True when every process's ``losses`` (the terms backpropagated into this step) and gradients are
        finite; otherwise False on every process, or :class:`NonFiniteUpdateError` under 'stop' or past the
        limit. Every process must call this (one all-reduce of a flag when there are several).

        ``where`` names the step in messages (e.g. "iteration 12, optimiser step 1 of 2").
        """
        bad_losses = sum(not math.isfinite(float(loss)) for loss in losses)
        scaled = getattr(accelerator, "scaler", None) is not None  # fp16: the scaler checks the gradients
        bad_params = [] if scaled else nonfinite_gradients(accelerator.unwrap_model(model))
        flag = float(bool(bad_losses or bad_params))
        if accelerator.num_processes > 1:
            flag = float(accelerator.reduce(torch.tensor([flag], device=accelerator.device), reduction="sum")[0])
        if flag == 0:
            self.consecutive = 0
            return True
        if bad_losses or bad_params:
            what = (f"{where}: non-finite {bad_losses} of {len(losses)} loss terms and the gradients of "
                    f"{len(bad_params)} parameters {bad_params[:8]} on process {accelerator.process_index}")
        else:
            what = f"{where}: another process has a non-finite loss or gradient"
        if self.on_nonfinite == "stop":
            raise NonFiniteUpdateError(f"{what}; stopping (--grpo.optim.on-nonfinite stop). The weights and optimiser "
                                       "state are those before this step; lower the learning rate or check the "
                                       "rewards and the model's outputs for NaN")
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteUpdateError(f"{what}; {self.consecutive} optimiser steps in a row were non-finite "
                                       f"(--grpo.optim.max-consecutive-nonfinite {self.max_consecutive}): the policy "
                                       "itself produces them. The weights are those of the last finite step")
        logger.warning("%s; optimiser step skipped on every process (%d in a row, %d in the run)", what,
                       self.consecutive, self.skipped)
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive, self.skipped = int(state.get("consecutive", 0)), int(state.get("skipped", 0))
