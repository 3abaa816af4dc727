"""Advantage-weighted matching (AWM): the pretraining loss on the policy's own samples, weighted by advantage.

Why: the ratio objective's gradient is a score-matching gradient whose target is the *noisy* next
state x_{t'} of the rollout; AWM (Xue et al. 2025, "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", arXiv:2509.25050) shows DDPO is denoising score matching with noisy targets
and replaces it by the same loss on the *clean* sample, which has lower variance:

    L_AWM(theta) = mean_i  clip(A_i) || f_theta(x_t_i, t_i) - target(x0_i, eps_i, t_i) ||^2 / D
                 + kl_coef * mean_i || f_theta(x_t_i, t_i) - f_ref(x_t_i, t_i) ||^2 / D

with x_t = alpha_t x0 + sigma_t eps a fresh forward noising (``diffgrpo.forward_process``) of the
rollout's final sample x0_i, t_i drawn by ``TimestepSampling``, A_i the group-relative advantage
(``diffgrpo.advantages``) and target the pretraining target of the model's parametrisation
(x0, eps, v or velocity), or x0 itself with ``regression_space="x0"``.
The sampler does not enter: any sampler (deterministic included) can produce x0.

Negative advantages are kept as they are (signed weights), bounded only by a symmetric clip.
Why: group-relative advantages sum to 0 within a group, so sum_i A_i grad l_i is the
policy-gradient estimator with the group mean as its baseline. Dropping (or zeroing) the negative
advantages makes the weights sum to n mean(A+) > 0, which adds mean(A+) sum_i grad l_i, the
gradient of "fit your own samples": 0 in expectation only for a model that reproduces its samples
exactly, otherwise a bias towards the current policy; and it discards half of each group's
information (more variance for the same number of samples). Mapping A to exp(A / lambda) (RWR/AWR)
keeps every weight positive and carries the same bias. The cost of signed weights: a
negatively weighted term alone is unbounded below (the prediction can be pushed away without
limit), so the clip bounds each weight, and several updates on one batch need the KL guard
(``kl_coef``); on-policy (one update per batch) each term moves the model by one bounded step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from diffgrpo.forward_process import ForwardProcess, NoisedBatch, regression_residual
from diffgrpo.guard import prediction_gap


@dataclass(frozen=True)
class AWMConfig:
    """Advantage-weighted matching's settings, checked at construction."""

    max_abs_advantage: float | None = 5.0
    """Clip the advantage to [-max, max] before weighting (5: Flow-GRPO's and DiffusionNFT's
    ``adv_clip_max``; group-normalised advantages rarely reach it). None: no clip."""
    regression_space: Literal["prediction", "x0"] = "prediction"
    """prediction: the pretraining loss of the model's parametrisation (AWM's choice: the objective
    stays the pretraining one). x0: regress the implied clean sample (weights t by b_t^2, see
    ``diffgrpo.forward_process.regression_residual``)."""
    kl_coef: float = 0.0
    """Weight of the prediction gap to the frozen reference (``diffgrpo.guard``); > 0 needs
    ``prediction_ref``."""

    def __post_init__(self) -> None:
        if self.max_abs_advantage is not None and not (
            math.isfinite(self.max_abs_advantage) and self.max_abs_advantage > 0
        ):
            raise ValueError(f"max_abs_advantage={self.max_abs_advantage!r} must be finite and > 0, or None")
        if self.regression_space not in ("prediction", "x0"):
            raise ValueError(f"regression_space={self.regression_space!r} is not one of 'prediction', 'x0'")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef={self.kl_coef!r} must be finite and >= 0")


@dataclass(frozen=True)
class AWMStats:
    """Detached 0-dim diagnostics over the samples that entered the loss."""

    loss: Tensor
    policy_loss: Tensor
    """The advantage-weighted matching term alone."""
    matching_error: Tensor
    """Unweighted mean squared error (the pretraining loss on these samples): watch it grow when drifting."""
    kl: Tensor
    """Mean prediction gap to the reference (0 without ``prediction_ref``)."""
    clip_frac: Tensor
    """Fraction of samples whose |advantage| exceeded max_abs_advantage."""
    num_samples: Tensor

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


def sample_mean(values: Float[Tensor, " N"], mask: Bool[Tensor, " N"] | None) -> tuple[Tensor, Tensor]:
    """(mean of ``values`` over the kept samples, their count); mean 0 when none is kept."""
    n = values.shape[0]
    if mask is None:
        return values.sum() / max(n, 1), torch.tensor(float(n), device=values.device)
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    count = mask.sum().float()
    return (values * mask).sum() / count.clamp(min=1), count


def check_objective_inputs(
    prediction: Tensor, batch: NoisedBatch, advantages: Tensor, others: dict[str, Tensor | None], kl_coef: float
) -> None:
    """Shapes, finiteness and the guard's reference, shared by the forward-process objectives; raises
    ValueError naming the input."""
    if kl_coef > 0 and others.get("prediction_ref") is None:
        raise ValueError(f"kl_coef={kl_coef} needs prediction_ref (the reference model at batch.x_t); "
                         "or set kl_coef=0")
    if prediction.shape != batch.x0.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} must have the noised batch's shape "
                         f"{tuple(batch.x0.shape)}: evaluate the model at batch.x_t, batch.timesteps")
    n = prediction.shape[0]
    if advantages.shape != (n,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({n},): one per noised "
                         "sample (repeat them with the samples when training several t per sample)")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or inf")
    for name, other in others.items():
        if other is not None and other.shape != prediction.shape:
            raise ValueError(f"{name} {tuple(other.shape)} must have prediction's shape {tuple(prediction.shape)}")


def kl_guard(
    prediction: Tensor, prediction_ref: Tensor | None, mask: Bool[Tensor, " N"] | None
) -> Tensor:
    """Mean prediction gap to the reference over the kept samples (``diffgrpo.guard``); 0 without a reference."""
    if prediction_ref is None:
        return torch.zeros((), device=prediction.device)
    return sample_mean(prediction_gap(prediction, prediction_ref), mask)[0]


def awm_loss(
    prediction: Float[Tensor, "N ..."],
    batch: NoisedBatch,
    advantages: Float[Tensor, " N"],
    process: ForwardProcess,
    cfg: AWMConfig,
    *,
    prediction_ref: Float[Tensor, "N ..."] | None = None,
    mask: Bool[Tensor, " N"] | None = None,
) -> tuple[Tensor, AWMStats]:
    """The AWM loss (module docstring) and its diagnostics.

    Args:
        prediction: f_theta(batch.x_t, batch.timesteps) in the model's parametrisation, with gradient.
        batch: the rollout's final samples noised by ``diffgrpo.forward_process.forward_noise``.
        advantages: one per row of ``batch`` (detached here), e.g. ``compute_advantages(...).advantages``.
        prediction_ref: the frozen reference's prediction at the same (x_t, t); needed when kl_coef > 0.
        mask: rows that enter the loss (``AdvantageResult.mask``).
    """
    check_objective_inputs(prediction, batch, advantages, {"prediction_ref": prediction_ref}, cfg.kl_coef)
    n = prediction.shape[0]
    adv = advantages.detach().float()
    bound = math.inf if cfg.max_abs_advantage is None else cfg.max_abs_advantage
    weight = adv.clamp(-bound, bound)  # [N]
    residual = regression_residual(process, prediction, batch, cfg.regression_space)
    error = residual.square().reshape(n, -1).mean(dim=1)  # [N] per-sample pretraining loss
    policy_loss, count = sample_mean(weight * error, mask)
    kl = kl_guard(prediction, prediction_ref, mask)
    loss = policy_loss + cfg.kl_coef * kl if cfg.kl_coef > 0 else policy_loss
    with torch.no_grad():
        stats = AWMStats(
            loss=loss.detach(),
            policy_loss=policy_loss.detach(),
            matching_error=sample_mean(error.detach(), mask)[0],
            kl=kl.detach(),
            clip_frac=sample_mean((adv.abs() > bound).float(), mask)[0],
            num_samples=count,
        )
    return loss, stats
