"""DiffusionNFT: reinforcement on the forward process with implicit positive and negative policies.

Why: like AWM (``diffgrpo.awm``) it trains on fresh forward noisings of the rollout's clean samples,
so any sampler works (deterministic, CFG-free, no step log-probs); unlike AWM it moves the policy
relative to an *old* policy f_old (an EMA of the trained weights), which bounds each update
(Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117).

Per noised sample (x_t, t) of a clean sample x0 with group-relative advantage A (symbols of the paper):

    r        = 1/2 + 1/2 clip(A / A_max, -1, 1)                 optimality probability in [0, 1]
    f_plus   = (1 - beta) f_old + beta f_theta                  implicit positive policy
    f_minus  = (1 + beta) f_old - beta f_theta                  implicit negative policy
    l_pm     = w_pm || e(f_pm) ||^2 / D,  w_pm = 1 / sg(mean |e(f_pm)|)   (adaptive weight, optional)
    L_NFT    = (A_max / beta) mean_i [ r_i l_plus_i + (1 - r_i) l_minus_i ]
             + kl_coef mean_i || f_theta - f_ref ||^2 / D      (``diffgrpo.guard``)

e(f) is the regression residual in ``regression_space`` (``forward_process.regression_residual``):
by default the implied clean sample minus x0, as the paper regresses x0 for velocity models. Both
mixtures have weights summing to 1, and x0_hat is affine in f at fixed (x_t, t), so the x0 of a
mixture is the same mixture of x0 estimates: regressing x0 or the native target trains the same
implicit policies, weighting t differently (b_t^2). The adaptive weight (the paper's choice) makes
each sample's loss scale-free, so noise levels whose x0 error is large (high t) do not dominate.
The factor A_max / beta makes the gradient independent of beta and A_max at first order:

    at f_old = f_theta (and without adaptive weights), grad L_NFT = grad of mean_i clip(A_i, +-A_max) l_i,

i.e. exactly advantage-weighted matching with the clipped advantage. The loss *value* is then
mean_i l_i, independent of the rewards -- only its gradient carries them. Hence the silent fault of
implementations that let f_old carry gradient or be the same graph as f_theta: the reward then
vanishes from the gradient too. Here f_old is always detached and the old-policy deviation
||f_theta - f_old||^2 is returned (``NFTStats.old_deviation``), 0 exactly when old == current.

The old policy (``update_old_policy``): theta_old <- eta_i theta_old + (1 - eta_i) theta after each
iteration's update, eta_i = min(rate * max(i - flat_steps, 0), max_decay) (the paper's schedule:
rate 0.001, max 0.5 by default; flat 75, rate 0.0075, max 0.999 for its OCR run). Early in training
eta ~ 0 makes the old policy the sampling policy (on-policy, AWM's gradient); later the lag of the
EMA is the trust region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from diffgrpo.awm import check_objective_inputs, kl_guard, sample_mean
from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_process import ForwardProcess, NoisedBatch, regression_residual
from diffgrpo.guard import prediction_gap


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT's settings, checked at construction."""

    beta: float = 1.0
    """Guidance strength of the implicit policies, > 0 (the paper's default 1; 0.1 for its OCR and
    multi-reward runs). Smaller beta: the implicit policies stay closer to the old one."""
    max_abs_advantage: float = 5.0
    """A_max of the optimality mapping r = 1/2 + 1/2 clip(A / A_max, -1, 1) (the paper's 5)."""
    regression_space: Literal["x0", "prediction"] = "x0"
    """x0: regress the implied clean sample (the paper's choice); prediction: the model's own target."""
    use_adaptive_weight: bool = True
    """Divide each sample's squared error by sg(mean |error|) (the paper's adaptive weighting)."""
    kl_coef: float = 0.0
    """Weight of the prediction gap to the frozen reference (``diffgrpo.guard``); > 0 needs
    ``prediction_ref``. The paper uses 1e-4 on SD3.5 with velocity predictions."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta={self.beta!r} must be finite and > 0 (e.g. 1.0 or 0.1)")
        if not (math.isfinite(self.max_abs_advantage) and self.max_abs_advantage > 0):
            raise ValueError(f"max_abs_advantage={self.max_abs_advantage!r} must be finite and > 0 (e.g. 5.0)")
        if self.regression_space not in ("x0", "prediction"):
            raise ValueError(f"regression_space={self.regression_space!r} is not one of 'x0', 'prediction'")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef={self.kl_coef!r} must be finite and >= 0")


@dataclass(frozen=True)
class OldPolicySchedule:
    """Decay eta_i of the old policy's EMA at iteration i: min(rate * max(i - flat_steps, 0), max_decay)."""

    flat_steps: int = 0
    """Iterations with eta = 0 (old policy = the last trained one)."""
    rate: float = 0.001
    """Growth of eta per iteration after flat_steps."""
    max_decay: float = 0.5
    """Cap of eta, in [0, 1)."""

    def __post_init__(self) -> None:
        if isinstance(self.flat_steps, bool) or not isinstance(self.flat_steps, int) or self.flat_steps < 0:
            raise ValueError(f"flat_steps={self.flat_steps!r} must be an int >= 0")
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate={self.rate!r} must be finite and >= 0")
        if not 0.0 <= self.max_decay < 1.0:
            raise ValueError(f"max_decay={self.max_decay!r} must be in [0, 1) (1 would freeze the old policy)")

    def decay(self, iteration: int) -> float:
        """eta at ``iteration`` (0-based count of completed policy updates)."""
        if iteration < 0:
            raise ValueError(f"iteration={iteration} must be >= 0")
        return min(self.rate * max(iteration - self.flat_steps, 0), self.max_decay)


def update_old_policy(old: ParameterEMA, model: nn.Module, iteration: int, schedule: OldPolicySchedule) -> float:
    """Move the old policy towards ``model`` with the scheduled decay; returns the decay used.

    Call once per iteration, after its policy update. ``old`` is a ``ParameterEMA`` of the trainable
    parameters (built from the model before training, so old = initial policy); evaluate f_old inside
    ``old.swapped_in(model)`` under ``torch.no_grad()``, *before* the forward pass that builds the
    graph of f_theta: the swap writes the parameters in place, which invalidates a graph built before
    it (autograd raises). The decay is stored on ``old`` (its ``decay`` attribute) and recomputed from
    the iteration, so a checkpoint of ``old``'s tensors plus the iteration restores the schedule.
    """
    old.decay = schedule.decay(iteration)
    old.update(model)
    return old.decay


@dataclass(frozen=True)
class NFTStats:
    """Detached 0-dim diagnostics over the samples that entered the loss."""

    loss: Tensor
    policy_loss: Tensor
    """(A_max / beta) mean_i [r l_plus + (1 - r) l_minus], without the KL term."""
    positive_loss: Tensor
    """Mean l_plus (weighted as configured)."""
    negative_loss: Tensor
    """Mean l_minus."""
    kl: Tensor
    """Mean prediction gap to the reference (0 without ``prediction_ref``)."""
    optimality_mean: Tensor
    """Mean r; 1/2 when the advantages are symmetric."""
    old_deviation: Tensor
    """Mean ||f_theta - f_old||^2 / D. Exactly 0 when the old policy equals the trained one: then the
    loss value carries no reward and only the gradient does (module docstring). 0 for a whole run
    means the old policy is never behind: check the schedule and that f_old is the EMA's."""
    old_deviation_max: Tensor
    num_samples: Tensor

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


def optimality_probability(advantages: Float[Tensor, " N"], max_abs_advantage: float) -> Float[Tensor, " N"]:
    """r = 1/2 + 1/2 clip(A / A_max, -1, 1) in [0, 1] (DiffusionNFT, Zheng et al. 2025): 1/2 for an average sample.

    ``advantages`` are group-relative (``diffgrpo.advantages``), so r is relative to the group.
    """
    if not (math.isfinite(max_abs_advantage) and max_abs_advantage > 0):
        raise ValueError(f"max_abs_advantage={max_abs_advantage!r} must be finite and > 0")
    return 0.5 + 0.5 * (advantages.detach().float() / max_abs_advantage).clamp(-1.0, 1.0)


def nft_loss(
    prediction: Float[Tensor, "N ..."],
    prediction_old: Float[Tensor, "N ..."],
    batch: NoisedBatch,
    advantages: Float[Tensor, " N"],
    process: ForwardProcess,
    cfg: NFTConfig,
    *,
    prediction_ref: Float[Tensor, "N ..."] | None = None,
    mask: Bool[Tensor, " N"] | None = None,
) -> tuple[Tensor, NFTStats]:
    """The DiffusionNFT loss (module docstring) and its diagnostics.

    Args:
        prediction: f_theta(batch.x_t, batch.timesteps) in the model's parametrisation, with gradient.
        prediction_old: the old policy's prediction at the same (x_t, t) (detached here).
        batch: the rollout's final samples noised by ``diffgrpo.forward_process.forward_noise``.
        advantages: one per row of ``batch`` (detached here), e.g. ``compute_advantages(...).advantages``.
        prediction_ref: the frozen reference's prediction at (x_t, t); needed when kl_coef > 0.
        mask: rows that enter the loss (``AdvantageResult.mask``).
    """
    others = {"prediction_old": prediction_old, "prediction_ref": prediction_ref}
    check_objective_inputs(prediction, batch, advantages, others, cfg.kl_coef)
    beta = cfg.beta
    old = prediction_old.detach()
    r = optimality_probability(advantages, cfg.max_abs_advantage)  # [N]
    positive = (1.0 - beta) * old + beta * prediction  # [N, ...] implicit positive policy
    negative = (1.0 + beta) * old - beta * prediction  # [N, ...] implicit negative policy
    loss_pos = _weighted_error(regression_residual(process, positive, batch, cfg.regression_space), cfg)  # [N]
    loss_neg = _weighted_error(regression_residual(process, negative, batch, cfg.regression_space), cfg)  # [N]
    per_sample = (cfg.max_abs_advantage / beta) * (r * loss_pos + (1.0 - r) * loss_neg)  # [N]
    policy_loss, count = sample_mean(per_sample, mask)
    kl = kl_guard(prediction, prediction_ref, mask)
    loss = policy_loss + cfg.kl_coef * kl if cfg.kl_coef > 0 else policy_loss
    with torch.no_grad():
        deviation = prediction_gap(prediction.detach(), old)  # [N]
        kept = deviation if mask is None else deviation[mask]
        stats = NFTStats(
            loss=loss.detach(),
            policy_loss=policy_loss.detach(),
            positive_loss=sample_mean(loss_pos.detach(), mask)[0],
            negative_loss=sample_mean(loss_neg.detach(), mask)[0],
            kl=kl.detach(),
            optimality_mean=sample_mean(r, mask)[0],
            old_deviation=sample_mean(deviation, mask)[0],
            old_deviation_max=kept.max() if kept.numel() else deviation.new_zeros(()),
            num_samples=count,
        )
    return loss, stats


def _weighted_error(residual: Tensor, cfg: NFTConfig) -> Tensor:
    """Per-sample mean squared residual, divided by sg(mean |residual|) (clamped at 1e-5) if adaptive."""
    flat = residual.reshape(residual.shape[0], -1)
    error = flat.square().mean(dim=1)
    if not cfg.use_adaptive_weight:
        return error
    return error / flat.detach().abs().mean(dim=1).clamp(min=1e-5)
