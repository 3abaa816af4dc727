"""GRPO surrogate over denoising steps (plain ratio or PPO clip) plus KL to a frozen reference.

Why: the paper maximises J = (1/G) sum_i (1/n) sum_t ratio_{i,t} A_i over the n stochastic
steps, ratio = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c), without clipping or KL
(MotionGRPO Algorithm 1 lines 7-9; docs/ego_motion_grpo.md); both are offered as options because
other settings need them.

Averaging: per sample over its trained steps, then over the samples that enter the loss
(mask True). Samples with no trained step are left out of the sample mean. When nothing is
selected (e.g. every group dropped as zero-std) the loss is an exact 0 that still carries a
graph, so a training step can call backward() unconditionally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from typing_extensions import assert_never

from diffgrpo.awm import AWMConfig
from diffgrpo.forward_process import TimestepSampling
from diffgrpo.nft import NFTConfig, OldPolicySchedule

FORWARD_OBJECTIVES = ("nft", "awm")
"""Objectives trained on fresh forward noisings of the rollout's final samples (``diffgrpo.forward_update``):
they need neither step log-densities nor a stochastic sampler."""


@dataclass(frozen=True)
class LossConfig:
    """GRPO objective options."""

    clip_range: float | tuple[float, float] | None = None
    """None: plain ratio * A (the paper). eps: PPO clip of the ratio to [1 - eps, 1 + eps].
    (eps_low, eps_high): asymmetric clip to [1 - eps_low, 1 + eps_high]. The ratio's scale
    depends on whether step log-probs are summed or averaged over dimensions; pick eps for one."""
    kl_coef: float = 0.0
    """Weight of the KL guard to the frozen reference, in the form the objective needs (docs/objectives.md):
    ratio: the exact per-step Gaussian KL (``gaussian_step_kl``); x0_regression: the gap between the
    clean-sample predictions of policy and reference at the rollout's states; nft and awm: the prediction
    gap ||f_theta(x_t, t) - f_ref(x_t, t)||^2 / D at the forward-noised x_t (``diffgrpo.guard``). > 0 costs
    one forward pass of the reference per loss term, without gradient."""
    objective: Literal["ratio", "x0_regression", "nft", "awm"] = "ratio"
    """ratio: the GRPO surrogate ratio * A (a score-function estimate: its noise grows with the
    dimension of each step's Gaussian). x0_regression: advantage-weighted regression of the step's
    clean-sample prediction onto the chain's own final sample, A_i ||x0_theta(x_k^i) - x0^i||^2 / 2
    (mean over dimensions); it moves predictions towards the better members of a group and away
    from the worse ones along the outcomes themselves rather than along the sampling noise (see
    `advantage_weighted_x0_loss`). nft: DiffusionNFT (``diffgrpo.nft``); awm: advantage-weighted
    matching (``diffgrpo.awm``); both train on fresh forward noisings of the final samples, so any
    sampler works, deterministic (eta = 0) included."""
    nft: NFTConfig = field(default_factory=NFTConfig)
    """DiffusionNFT's settings (objective 'nft' only); its guard weight is ``kl_coef``."""
    old_policy: OldPolicySchedule = field(default_factory=OldPolicySchedule)
    """Decay schedule of DiffusionNFT's old policy, an EMA of the trained weights (objective 'nft' only)."""
    awm: AWMConfig = field(default_factory=AWMConfig)
    """Advantage-weighted matching's settings (objective 'awm' only); its guard weight is ``kl_coef``."""
    forward_timesteps: TimestepSampling = field(default_factory=TimestepSampling)
    """Where nft / awm noise the final samples (``diffgrpo.forward_process.TimestepSampling``)."""
    timesteps_per_sample: int = 1
    """nft / awm: noise levels t drawn per final sample and update, each a loss term of its own (the
    counterpart of the ratio objective's trained steps)."""
    max_log_ratio: float = 20.0
    """Bound B (nats) on each step's log-ratio before exp: log_prob - log_prob_old is clamped to
    [-B, B], and a bounded term carries no gradient (counted in LossStats.bounded_frac). Why: step
    log-probs summed over ~10^4 dimensions drift by hundreds of nats after a few inner epochs, and
    exp overflows float32 past ~88, turning the loss into inf/NaN. Why 20: an on-policy ratio is 1
    (log-ratio 0, float32 rounding of summed log-probs is ~1e-2 at most) and any useful one lies
    within a clip range of ~0.2, so e^20 ~ 5e8 touches only ratios that are already meaningless,
    while ratio * A and its gradient stay far from float32 overflow."""

    def __post_init__(self) -> None:
        if self.clip_range is not None:
            low, high = self.bounds()
            if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < 1 < high):
                raise ValueError(
                    f"clip_range={self.clip_range!r} gives ratio bounds [{low}, {high}]; expected "
                    "0 <= 1 - eps_low < 1 < 1 + eps_high, i.e. eps (or each of eps_low, eps_high) in (0, 1]"
                )
        if self.objective not in ("ratio", "x0_regression", *FORWARD_OBJECTIVES):
            raise ValueError(f"objective={self.objective!r} is not one of 'ratio', 'x0_regression', 'nft', 'awm'; "
                             "fix --grpo.loss.objective")
        if self.objective != "ratio" and self.clip_range is not None:
            raise ValueError(f"objective={self.objective!r} has no ratio to clip; drop "
                             "--grpo.loss.clip-range, or use --grpo.loss.objective ratio")
        self._check_objective_settings()
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            raise ValueError(f"kl_coef={self.kl_coef!r} must be finite and >= 0")
        if not (math.isfinite(self.max_log_ratio) and self.max_log_ratio > 0):
            raise ValueError(
                f"max_log_ratio={self.max_log_ratio!r} must be finite and > 0 (nats; e.g. 20) so exp() "
                "cannot overflow"
            )

    def _check_objective_settings(self) -> None:
        """Settings of one objective given with another are refused (they would silently do nothing)."""
        unused = {"nft": self.nft != NFTConfig(), "old-policy": self.old_policy != OldPolicySchedule(),
                  "awm": self.awm != AWMConfig(), "forward-timesteps": self.forward_timesteps != TimestepSampling(),
                  "timesteps-per-sample": self.timesteps_per_sample != 1}
        owner = {"nft": ("nft",), "old-policy": ("nft",), "awm": ("awm",), "forward-timesteps": FORWARD_OBJECTIVES,
                 "timesteps-per-sample": FORWARD_OBJECTIVES}
        for name, given in unused.items():
            if given and self.objective not in owner[name]:
                raise ValueError(f"--grpo.loss.{name} settings were given but objective={self.objective!r} does not "
                                 f"use them; pass --grpo.loss.objective {owner[name][0]} or drop them")
        if self.nft.kl_coef != 0 or self.awm.kl_coef != 0:
            raise ValueError("the guard's weight of every objective is --grpo.loss.kl-coef; drop "
                             "--grpo.loss.nft.kl-coef / --grpo.loss.awm.kl-coef")
        if isinstance(self.timesteps_per_sample, bool) or self.timesteps_per_sample < 1:
            raise ValueError(f"timesteps_per_sample={self.timesteps_per_sample!r} must be an int >= 1; fix "
                             "--grpo.loss.timesteps-per-sample")

    def bounds(self) -> tuple[float, float]:
        """Ratio bounds (low, high) of the clip; (0, inf) without clipping."""
        if self.clip_range is None:
            return 0.0, math.inf
        if isinstance(self.clip_range, tuple):
            if len(self.clip_range) != 2:
                raise ValueError(f"clip_range={self.clip_range!r} must be (eps_low, eps_high)")
            eps_low, eps_high = self.clip_range
        else:
            eps_low = eps_high = self.clip_range
        return 1.0 - float(eps_low), 1.0 + float(eps_high)


@dataclass(frozen=True)
class LossStats:
    """Detached 0-dim diagnostics over the (sample, step) terms that entered the loss."""

    loss: Tensor
    ratio_mean: Tensor
    ratio_max_dev: Tensor
    """max |ratio - 1|: should be 0 (to float32 rounding) on the first update after sampling."""
    clip_frac: Tensor
    """Fraction of terms where the clipped branch wins the min (their gradient is 0)."""
    kl: Tensor
    """Mean per-step KL to the reference (0 when no `kl` was given)."""
    approx_kl: Tensor
    """Mean of (ratio - 1) - log(ratio), a non-negative estimate of KL(pi_old || pi_theta)."""
    bounded_frac: Tensor
    """Fraction of terms whose |log_ratio| exceeded LossConfig.max_log_ratio (0 when healthy)."""
    num_terms: Tensor

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


def gaussian_step_kl(
    mean: Float[Tensor, "N K *D"],
    mean_ref: Float[Tensor, "N K *D"],
    std: Float[Tensor, "..."] | float,
    reduction: Literal["sum", "mean"] = "sum",
) -> Float[Tensor, "N K"]:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per step, in nats.

    Why: policy and reference steps share the sampler's std, so the KL is exactly
    ||mean - mean_ref||^2 / (2 std^2) -- with the 1/(2 std^2) scaling that tiny late-step stds
    make large. `reduction` must match how step log-probs are reduced over dimensions:
    "sum" gives the KL of the joint step, "mean" the per-dimension average. `std` broadcasts
    against `mean` (e.g. shape (N, K, 1, ...)) and must be > 0: leave deterministic steps out.
    """
    if mean.shape != mean_ref.shape or mean.ndim < 2:
        raise ValueError(
            f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must match, shaped (N, K, ...)"
        )
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if not bool((std > 0).all()):
        raise ValueError("std must be > 0 at every step; exclude deterministic (std 0) steps before the KL")
    diff = mean.float() - mean_ref.float()
    per_dim = diff * diff / (2.0 * std * std)
    per_dim = per_dim.expand(mean.shape).reshape(*mean.shape[:2], -1)
    if reduction == "sum":
        return per_dim.sum(dim=-1)
    if reduction == "mean":
        return per_dim.mean(dim=-1)
    assert_never(reduction)


def grpo_loss(
    log_prob: Float[Tensor, "N K"],
    log_prob_old: Float[Tensor, "N K"],
    advantages: Float[Tensor, " N"],
    *,
    mask: Bool[Tensor, " N"] | None = None,
    step_mask: Bool[Tensor, "N K"] | Bool[Tensor, " K"] | None = None,
    kl: Float[Tensor, "N K"] | None = None,
    cfg: LossConfig,
) -> tuple[Tensor, LossStats]:
    """Loss = -J + beta * KL, J = mean_i mean_t min(r A_i, clip(r) A_i), r = exp(log_prob - log_prob_old).

    The log-ratio is clamped to [-cfg.max_log_ratio, cfg.max_log_ratio] before exp (see LossConfig).

    Args:
        log_prob: step log-densities under the current policy, with gradient.
        log_prob_old: the same steps under pi_old, recorded at sampling time (detached here).
        advantages: one per sample (detached here).
        mask: samples that enter the loss (AdvantageResult.mask).
        step_mask: trained steps, shared (K,) or per sample (N, K); see `select_steps`.
        kl: per-step KL to the reference (`gaussian_step_kl`), required when kl_coef > 0.
    """
    if log_prob.ndim != 2 or log_prob_old.shape != log_prob.shape:
        raise ValueError(
            f"log_prob {tuple(log_prob.shape)} and log_prob_old {tuple(log_prob_old.shape)} "
            "must both be (N, K)"
        )
    n, k = log_prob.shape
    if advantages.shape != (n,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({n},)")
    device = log_prob.device
    terms = torch.ones(n, k, dtype=torch.bool, device=device)  # [N, K] terms in the objective
    if mask is not None:
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
        terms = terms & mask[:, None]
    if step_mask is not None:
        if step_mask.dtype != torch.bool or step_mask.shape not in ((k,), (n, k)):
            raise ValueError(
                f"step_mask must be bool of shape ({k},) or ({n}, {k}), got {step_mask.dtype} "
                f"{tuple(step_mask.shape)}"
            )
        terms = terms & step_mask
    if kl is not None and kl.shape != (n, k):
        raise ValueError(f"kl has shape {tuple(kl.shape)}, expected ({n}, {k}) like log_prob")
    if cfg.kl_coef > 0 and kl is None:
        raise ValueError(
            f"kl_coef={cfg.kl_coef} needs the per-step `kl` (see gaussian_step_kl); or set kl_coef=0"
        )
    log_prob_old = log_prob_old.detach().float()
    advantages = advantages.detach().float()
    finite_inputs = torch.isfinite(log_prob_old).all() & torch.isfinite(advantages).all()
    if not bool(finite_inputs & torch.isfinite(log_prob.detach()).all()):  # one sync; the bound must not hide inf
        raise ValueError("log_prob, log_prob_old or advantages contain NaN or inf")

    raw_log_ratio = log_prob.float() - log_prob_old  # [N, K]
    bound = cfg.max_log_ratio
    log_ratio = raw_log_ratio.clamp(-bound, bound)  # exp cannot overflow; bounded terms get no gradient
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # [N, 1]
    surrogate = ratio * adv
    low, high = cfg.bounds()
    if cfg.clip_range is not None:
        clipped = ratio.clamp(low, high) * adv
        objective = torch.minimum(surrogate, clipped)
        clip_active = clipped < surrogate
    else:
        objective = surrogate
        clip_active = torch.zeros_like(terms)

    # Per-sample mean over its trained steps, then mean over samples with at least one step.
    weight = terms.float()
    steps_per_sample = weight.sum(dim=1)  # [N]
    has_steps = steps_per_sample > 0
    num_samples = has_steps.sum().clamp(min=1)
    term_weight = weight / (steps_per_sample.clamp(min=1)[:, None] * num_samples)  # [N, K], sums to 1 (or 0)

    loss = -(objective * term_weight).sum()
    if kl is not None:
        kl_mean = (kl.float() * term_weight).sum()
    else:
        kl_mean = torch.zeros((), device=device)
    if cfg.kl_coef > 0:
        loss = loss + cfg.kl_coef * kl_mean

    with torch.no_grad():
        num_terms = weight.sum()
        denom = num_terms.clamp(min=1)
        dev = ((ratio - 1).abs() * weight).amax() if n * k else ratio.new_zeros(())
        stats = LossStats(
            loss=loss.detach(),
            ratio_mean=(ratio * weight).sum() / denom,
            ratio_max_dev=dev,
            clip_frac=(clip_active.float() * weight).sum() / denom,
            kl=kl_mean.detach(),
            approx_kl=(((ratio - 1) - log_ratio) * weight).sum() / denom,
            bounded_frac=((raw_log_ratio.abs() > bound).float() * weight).sum() / denom,
            num_terms=num_terms,
        )
    return loss, stats


def select_steps(
    num_steps: int,
    mode: Literal["all", "random_fraction", "window"] = "all",
    *,
    fraction: float = 1.0,
    window: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    is_stochastic: Bool[Tensor, " K"] | None = None,
) -> Bool[Tensor, " K"]:
    """Which of the K recorded steps to train on, as a (K,) bool mask.

    Why: training on a subset or window of denoising steps cuts the cost of re-scoring, and
    deterministic steps (std 0) have no density and must never enter the loss. Step index k is
    the position along the K axis of the rollout (k = 0 is the first, noisiest step).

    all: every stochastic step. random_fraction: round(fraction * S) of the S stochastic steps
    (at least 1), uniformly without replacement using `generator`. window: stochastic steps
    with start <= k < end.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an int >= 1")
    if is_stochastic is None:
        stochastic = torch.ones(num_steps, dtype=torch.bool)
    else:
        if is_stochastic.shape != (num_steps,) or is_stochastic.dtype != torch.bool:
            raise ValueError(f"is_stochastic must be a bool tensor of shape ({num_steps},)")
        stochastic = is_stochastic.cpu()
    candidates = stochastic.nonzero().flatten()
    if candidates.numel() == 0:
        raise ValueError("is_stochastic marks no step as stochastic; nothing can be trained")
    if mode == "all":
        selected = stochastic.clone()
    elif mode == "random_fraction":
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r} must be in (0, 1] for mode='random_fraction'")
        if generator is None:
            raise ValueError("mode='random_fraction' needs an explicit torch.Generator")
        count = max(1, round(fraction * candidates.numel()))
        order = torch.randperm(candidates.numel(), generator=generator, device=generator.device).cpu()
        selected = torch.zeros(num_steps, dtype=torch.bool)
        selected[candidates[order[:count]]] = True
    elif mode == "window":
        if window is None or len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
            raise ValueError(f"window={window!r} must be (start, end) with 0 <= start < end <= {num_steps}")
        selected = torch.zeros(num_steps, dtype=torch.bool)
        selected[window[0] : window[1]] = True
        selected &= stochastic
        if not bool(selected.any()):
            raise ValueError(f"window={window} contains no stochastic step; move or widen it")
    else:
        assert_never(mode)
    device = is_stochastic.device if is_stochastic is not None else torch.device("cpu")
    return selected.to(device)


def advantage_weighted_x0_loss(
    x0_pred: Float[Tensor, "N ..."],
    x0_final: Float[Tensor, "N ..."],
    advantages: Float[Tensor, " N"],
    mask: Bool[Tensor, " N"] | None = None,
) -> Tensor:
    """mean over kept samples of A_i * ||x0_pred_i - x0_final_i||^2 / 2, the squared error averaged over dimensions.

    Why: with group-normalised advantages (zero mean within a group) and a state shared by the group
    (x_T), the gradient is -sum_i A_i x0_final_i . d x0_pred: it points the prediction at the
    advantage-weighted outcomes of the group, a direction estimated from the samples themselves. The
    score-function gradient of the ratio objective instead projects each step's Gaussian noise,
    whose dimension (about 14,000 for a 64-frame motion) swamps the reward's few relevant directions.
    This is reward-weighted regression (as in RWR / AWR) with signed, group-relative weights;
    ``x0_final`` and ``advantages`` are constants (detached).
    """
    if x0_pred.shape != x0_final.shape or advantages.shape != x0_pred.shape[:1]:
        raise ValueError(f"x0_pred {tuple(x0_pred.shape)}, x0_final {tuple(x0_final.shape)} and advantages "
                         f"{tuple(advantages.shape)} must share the leading N (and x0 shapes must match)")
    n = x0_pred.shape[0]
    per_sample = 0.5 * (x0_pred.float() - x0_final.detach().float()).square().reshape(n, -1).mean(dim=1)
    weight = advantages.detach().float()
    if mask is not None:
        weight = weight * mask.float()
        count = mask.sum().clamp(min=1)
    else:
        count = torch.tensor(max(n, 1), device=x0_pred.device)
    return (weight * per_sample).sum() / count
