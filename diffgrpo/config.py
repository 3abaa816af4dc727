"""Typed, frozen configs for the GRPO core; recipes nest them and ``tyro`` turns them into flags.

Why frozen dataclasses: a config is checked once, in ``__post_init__``, before any model work,
and cannot drift afterwards; ``tyro.cli`` shows each field's docstring as its ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffgrpo.advantages import AdvantageConfig
from diffgrpo.loss import LossConfig


@dataclass(frozen=True)
class SamplerConfig:
    """How one reverse step becomes a Gaussian policy (see ``diffgrpo.sde``)."""

    method: str | None = None
    """Step rule: ddim, ddpm, egoallo (DDPM family) or flow_sde, cps (flow matching); None = the
    scheduler's default (DDIM -> ddim, DDPM -> ddpm, FlowMatchEuler -> flow_sde)."""
    eta: float = 1.0
    """Noise scale of the stochastic step (DDIM eta; EgoAllo uses 0.8; flow SDE 'a')."""
    log_prob_reduction: Literal["sum", "mean"] = "mean"
    """'mean' averages the per-dimension log-density: ratios then have a scale independent of the
    sample size, so clip ranges and learning rates carry over between tasks; 'sum' is the exact
    joint density."""
    egoallo_denominator_offset: float = 0.1
    """The '+0.1' of EgoAllo's released sampler (method 'egoallo' only); 0 gives the plain form."""

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")
        if self.log_prob_reduction not in ("sum", "mean"):
            raise ValueError(f"sampler.log_prob_reduction must be 'sum' or 'mean', got {self.log_prob_reduction!r}")


@dataclass(frozen=True)
class StepSelectionConfig:
    """Which stochastic steps of each chain enter the loss."""

    mode: Literal["all", "random_fraction", "window"] = "all"
    fraction: float = 1.0
    """For random_fraction: share of the stochastic steps drawn (fresh each iteration)."""
    window: tuple[int, int] = (0, 1_000_000)
    """For window: [start, end) step indices in sampling order (0 = the noisiest step)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"steps.fraction must be in (0, 1], got {self.fraction}")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"steps.window must be (start, end) with start < end, got {self.window}")


@dataclass(frozen=True)
class PerturbConfig:
    """Per-member perturbation of the raw condition (MotionGRPO section 8)."""

    name: str = "none"
    """Perturber from the registry: none, gaussian or perlin."""
    scale: float = 0.0
    """lambda: amplitude of the added noise, in the raw condition's units."""
    frequency: float = 1.0 / 32.0
    """Perlin only: lattice cells per frame along the condition's time axis (about one smooth bump
    per cell: 1/32 gives a bump roughly every second at 30 fps)."""
    octaves: int = 1
    """Perlin only: number of octaves."""

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"perturb.scale must be >= 0, got {self.scale}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and gradient clipping."""

    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run: sampling, groups, advantages, loss, optimiser, bookkeeping."""

    seed: int = 0
    num_iterations: int = 20
    """Outer iterations: sample groups, score, update."""
    conditions_per_iteration: int = 4
    """B: conditions per process per iteration (each gets its own group)."""
    group_size: int = 8
    """G: samples per condition sharing one initial noise."""
    inner_epochs: int = 1
    """Passes over each rollout batch (the first is exactly on-policy)."""
    micro_batch_size: int = 32
    """Chains per network call, in rollout and in the update alike (same batches -> ratio 1)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    steps: StepSelectionConfig = field(default_factory=StepSelectionConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rewards: tuple[str, ...] = ()
    """Rewards as 'name' or 'name:weight' (e.g. shapes_iou:1.0); names from the reward registry."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (0 = only at the end)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"

    def __post_init__(self) -> None:
        for name in ("num_iterations", "conditions_per_iteration", "group_size", "inner_epochs",
                     "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if not self.rewards:
            raise ValueError("no rewards configured: pass --rewards NAME[:WEIGHT] ... "
                             "(see diffgrpo.rewards.available_rewards())")
