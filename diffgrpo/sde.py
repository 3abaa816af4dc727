"""One reverse diffusion step as a Gaussian N(mean, std^2 I) with the exact log-density of its sample.

Why: GRPO treats each step x_t -> x_{t'} as an action and needs log pi(x_{t'} | x_t, c) both when
sampling and, later, when re-scoring stored steps. diffusers' `step()` returns neither mean, std nor a
density, and is stateful (a flow-match scheduler advances a private step index), so everything here
is a pure, batched function of (x_t, model output, t, t') that only *reads* the scheduler's tables.

Conventions
- DDPM family (`DDIMScheduler`, `DDPMScheduler`): `t` indexes `scheduler.alphas_cumprod` (abar_t);
  `t' < 0` means "final": abar = `final_alpha_cumprod` for DDIM, 1 for DDPM. EgoAllo's integer k
  (whose table starts with abar = 1 at k = 0) is diffusers' k - 1, so its schedule 1000, 841, ..., 1, 0
  is passed as 999, 840, ..., 0, -1 with `next_timestep` given explicitly.
- Flow matching (`FlowMatchEulerDiscreteScheduler`): x_t = (1 - sigma) x0 + sigma x1 (x1 = noise),
  the model predicts v = x1 - x0, and sigma = t / num_train_timesteps.
- Densities are computed in float32 (float64 if an input is float64), whatever the model's dtype.

Where the rest lives: each method's formulas, as coefficients of an affine map of (x_t, model output),
in ``diffgrpo.step_rules``; reading (t, t') and abar / sigma from the scheduler's tables in
``diffgrpo.schedule_tables``. This module turns coefficients into the Gaussian step and its density:
:func:`reverse_step` for any (t, t') per element, :func:`fixed_step` for a chain's step whose
coefficients were computed once (``diffgrpo.chain``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from jaxtyping import Bool, Float
from torch import Tensor

from diffgrpo.exploration import ExplorationSubspace
from diffgrpo.schedule_tables import Method, _check_method, _default_method, step_coefficients
from diffgrpo.step_rules import StepCoefficients, prediction_coefficients

Reduction = Literal["sum", "mean"]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class StepOutput:
    """Result of one step t -> t'. Frozen so a stored `prev_sample` cannot drift from its `log_prob`."""

    prev_sample: Float[Tensor, "B ..."]
    """x_{t'} in the sample's dtype: drawn from N(mean, std^2), or the `prev_sample` that was passed in."""
    mean: Float[Tensor, "B ..."]
    """Gaussian mean, density dtype (float32 or float64)."""
    std: Float[Tensor, "B ..."]
    """Gaussian std, shape (B, 1, ..., 1) so it broadcasts against the sample; 0 for deterministic steps."""
    log_prob: Float[Tensor, " B"]
    """log N(prev_sample; mean, std^2 I) in nats (summed or averaged over non-batch dims); 0 where std = 0."""
    x0_pred: Float[Tensor, "B ..."]
    """The clean-sample estimate the step was built from (after the scheduler's clipping, if any)."""
    is_stochastic: Bool[Tensor, " B"]
    """std > 0. Deterministic steps have no density: callers must leave them out of ratios and losses."""
    next_timestep: Float[Tensor, " B"]
    """The resolved t' per element (-1 = final for the DDPM family), so the exact pair can be re-scored."""
    subspace: ExplorationSubspace | None = None
    """Where the step's noise and density live (``diffgrpo.exploration``); None: the whole sample."""

    def density_coordinates(self, v: Float[Tensor, "B ..."]) -> Float[Tensor, "B r"]:
        """``v`` in the coordinates the density is defined on: the subspace's, else every entry flattened.

        Use it for anything compared between step Gaussians (KL, movement): outside an exploration
        subspace the step is deterministic and has no density.
        """
        return v.reshape(v.shape[0], -1) if self.subspace is None else self.subspace.coordinates(v)


def gaussian_log_prob(
    x: Float[Tensor, "B ..."],
    mean: Float[Tensor, "B ..."],
    std: Float[Tensor, "B ..."],
    reduction: Reduction = "sum",
) -> Float[Tensor, " B"]:
    """log N(x; mean, std^2 I) per batch element, in nats, computed in float32 or better.

    Why "sum": it is the exact log-density of the step, so ratios exp(lp - lp_old) are true likelihood
    ratios. Why "mean" (per-dimension average): its scale does not grow with the sample size, so PPO clip
    ranges tuned on one data shape transfer to another. Elements with std == 0 contribute 0 (no density);
    NaN/inf inputs give NaN, never a silent 0.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"log_prob_reduction={reduction!r} is not one of 'sum', 'mean'.")
    if x.shape != mean.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but mean has {tuple(mean.shape)}; they must match.")
    dtype = torch.float64 if torch.float64 in (x.dtype, mean.dtype, std.dtype) else torch.float32
    x, mean, std = x.to(dtype), mean.to(dtype), std.to(dtype)
    if bool((std < 0).any()):
        raise ValueError("std has negative entries; pass a standard deviation, not a log or a variance.")
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))  # keeps gradients finite where std == 0
    batch, dims = x.shape[0], max(x[0].numel(), 1)
    # Masks multiply rather than select, so non-finite inputs still surface as NaN instead of a silent 0.
    if std.numel() == batch:  # one std per element (what steps return): reduce first, fewer full passes
        safe_std, positive = safe_std.reshape(batch), positive.reshape(batch)
        sq_dist = (x - mean).square().reshape(batch, -1).sum(1)
        out = (-0.5 * (sq_dist / safe_std) / safe_std - dims * (safe_std.log() + _LOG_SQRT_2PI)) * positive
    else:
        elementwise = -0.5 * ((x - mean) / safe_std).square() - safe_std.log() - _LOG_SQRT_2PI
        out = (elementwise * positive).reshape(batch, -1).sum(dim=1)
    return out / dims if reduction == "mean" else out


def reverse_step(
    scheduler: DDIMScheduler | DDPMScheduler | FlowMatchEulerDiscreteScheduler,
    model_output: Float[Tensor, "B ..."],
    timestep: int | float | Tensor,
    sample: Float[Tensor, "B ..."],
    *,
    eta: float = 1.0,
    prev_sample: Float[Tensor, "B ..."] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    next_timestep: int | float | Tensor | None = None,
    method: Method | None = None,
    log_prob_reduction: Reduction = "sum",
    egoallo_denominator_offset: float = 0.1,
    subspace: ExplorationSubspace | None = None,
) -> StepOutput:
    """Take (or score) one reverse step x_t -> x_{t'} and return its Gaussian and log-density.

    Why: rollouts call this with `generator` to sample; the policy update calls it again with the
    stored `prev_sample` and `next_timestep` to re-score, with identical numerics, so the ratio is 1
    on-policy. `timestep`/`next_timestep`: scalar or (B,), a different t per element is fine.
    `next_timestep=None` reads t' from the scheduler's tables, never from t - T // n (wrong for
    "linspace"/"trailing" spacings): DDIM and DDPM take the entry after t in `scheduler.timesteps`
    (-1 = final after the last entry; t must be in the table, else pass `next_timestep`), a DDPM
    scheduler without `set_timesteps` takes t - 1 (the full chain), flow the next `scheduler.sigmas`.
    `method=None` picks ddim / ddpm / flow_sde by scheduler class. `generator` may be one generator or
    a list of B (one stream per element). Methods (abar = alphas_cumprod, ' = at t'):
      ddim:    std = eta sqrt(posterior_variance), mean = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps.
      ddpm:    the posterior q(x_t' | x_t, x0) (= ddim at eta = 1); eta only scales its std.
      egoallo: mean = sqrt(abar') x0 + sqrt(1 - abar' - s^2) (x_t - sqrt(abar) x0) / sqrt(1 - abar + offset),
               s = eta sqrt(posterior_variance(abar_t, abar_{t-1})) (single-step, at t - 1 not t');
               s = 0 where abar' = 1 (a step into the clean end, e.g. t = 0 -> final, is deterministic).
      flow_sde, cps: see ``diffgrpo.step_rules``; a step into sigma' = 0 is deterministic.
    x0 follows the scheduler's `clip_sample` / `thresholding` settings, as diffusers' `step()` does.
    `log_prob_reduction`: "sum" (default: the exact density) or "mean" (per dimension, see
    `gaussian_log_prob`). `subspace` (``diffgrpo.exploration``): the noise lives in an orthonormal
    subspace B and the rest of the step is the method's eta = 0 rule, mean = mu_0 + B B^T (mu_eta - mu_0);
    the density, and its "mean" reduction, are over the subspace's r coordinates. A sampled
    `prev_sample` comes back in the sample's dtype and is scored as
    returned, so re-scoring it later reproduces `log_prob` exactly.
    """
    if method is None:
        method = _default_method(scheduler)
    family = _check_method(scheduler, method)
    _check_shapes(model_output, sample, prev_sample)
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta={eta} must be finite and >= 0.")
    if method in ("ddim", "cps") and eta > 1:
        raise ValueError(f"eta={eta} > 1 is undefined for method={method!r}; use 0 <= eta <= 1.")
    if egoallo_denominator_offset < 0:
        raise ValueError(
            f"egoallo_denominator_offset={egoallo_denominator_offset} must be >= 0 (EgoAllo uses 0.1)."
        )
    if log_prob_reduction not in ("sum", "mean"):
        raise ValueError(f"log_prob_reduction={log_prob_reduction!r} is not one of 'sum', 'mean'.")

    batch = sample.shape[0]
    dtype = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else torch.float32
    x_t, out = sample.to(dtype), model_output.to(dtype)
    bshape = (batch,) + (1,) * (sample.ndim - 1)  # (B, 1, ..., 1)

    coef, resolved_next = step_coefficients(scheduler, timestep, next_timestep, batch, method=method, eta=eta,
                                            egoallo_denominator_offset=egoallo_denominator_offset)
    view = lambda c: c.to(x_t.device, dtype).reshape(bshape)  # (B,) float64 -> (B, 1, ..., 1)
    x0 = affine(view(coef.x0_x_t), x_t, view(coef.x0_out), out)
    mean = affine(view(coef.mean_x_t), x_t, view(coef.mean_out), out)
    if family == "ddpm" and clips_x0(scheduler):
        clipped = _clip_x0(scheduler, x0)
        mean, x0 = mean.addcmul_(view(coef.mean_x0), clipped - x0), clipped
    std = view(coef.std)
    if subspace is None:
        if prev_sample is None:
            noise = _draw_noise(sample.shape, generator, x_t.device, dtype)
            prev_sample = torch.addcmul(mean, std, noise).to(sample.dtype)
        log_prob = gaussian_log_prob(prev_sample.to(dtype), mean, std, log_prob_reduction)
    else:  # noise in span(B), the eta = 0 rule elsewhere (module docstring of diffgrpo.exploration)
        deterministic = reverse_step(
            scheduler, model_output, timestep, sample, eta=0.0, prev_sample=sample, next_timestep=next_timestep,
            method=method, egoallo_denominator_offset=egoallo_denominator_offset).mean
        mean = deterministic + subspace.project(mean - deterministic)
        if prev_sample is None:
            noise = _draw_noise((batch, subspace.num_coordinates), generator, x_t.device, dtype)  # (B, r)
            prev_sample = torch.addcmul(mean, std, subspace.embed(noise)).to(sample.dtype)
        log_prob = gaussian_log_prob(subspace.coordinates(prev_sample.to(dtype)), subspace.coordinates(mean),
                                     std.reshape(batch, 1), log_prob_reduction)
    if not bool(torch.isfinite(log_prob).all()):  # (B,) check; NaN/inf inputs all propagate to here
        _raise_non_finite(model_output, sample, prev_sample)
    return StepOutput(
        prev_sample=prev_sample,
        mean=mean,
        std=std,
        log_prob=log_prob,
        x0_pred=x0,
        is_stochastic=std.reshape(batch) > 0,
        next_timestep=resolved_next.to(x_t.device, dtype),
        subspace=subspace,
    )


def affine(a: Tensor | float, x: Tensor, b: Tensor | float, y: Tensor) -> Tensor:
    """a x + b y: one new tensor, two passes over the latents (one when a = 1); a, b numbers or tensors
    broadcasting to x. (On a CPU, writing a fresh tensor costs several times an in-place pass: its pages are new.)"""
    if isinstance(b, Tensor):
        return (x * a).addcmul_(b, y)
    if isinstance(a, float) and a == 1.0:
        return torch.add(x, y, alpha=b)
    return (x * a).add_(y, alpha=b)


def fixed_step(
    coef: StepCoefficients,
    model_output: Float[Tensor, "B ..."],
    sample: Float[Tensor, "B ..."],
    *,
    next_timestep: float,
    prev_sample: Float[Tensor, "B ..."] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    log_prob_reduction: Reduction = "sum",
    clip_x0=None,
) -> StepOutput:
    """:func:`reverse_step` for one step whose coefficients are already known (``StepCoefficients.row``).

    Why: a sampling chain fixes every (t, t') when it is built, so the schedule lookups, checks and
    coefficient formulas run once per chain (``diffgrpo.chain``) and a step is only its arithmetic:
    mean (2 passes), x0 (1), the noise draw and x_{t'} (2, in place), and the squared distance for the
    density (2), with three new latent-sized tensors when scoring and four when sampling.
    Same Gaussian as :func:`reverse_step` (to float32 rounding) and the same noise draws, so a chain
    sampled here and re-scored here reproduces its log-probabilities exactly. ``clip_x0``: the scheduler's
    x0 clipping (``_clip_x0`` bound to it) or None. ``next_timestep``: the resolved t' to report.
    """
    _check_shapes(model_output, sample, prev_sample)
    batch = sample.shape[0]
    dtype = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else torch.float32
    x_t = sample if sample.dtype == dtype else sample.to(dtype)
    out = model_output if model_output.dtype == dtype else model_output.to(dtype)
    x0 = affine(coef.x0_x_t, x_t, coef.x0_out, out)
    mean = affine(coef.mean_x_t, x_t, coef.mean_out, out)
    if clip_x0 is not None:
        clipped = clip_x0(x0)
        mean, x0 = mean.add_(clipped - x0, alpha=coef.mean_x0), clipped
    std = coef.std
    if prev_sample is None:  # x_{t'} = mean + std noise, written into the noise's own memory
        prev_sample = _draw_noise(sample.shape, generator, x_t.device, dtype).mul_(std).add_(mean).to(sample.dtype)
    diff = ((prev_sample if prev_sample.dtype == dtype else prev_sample.to(dtype)) - mean).reshape(batch, -1)
    if std > 0:  # gaussian_log_prob with one std for all: -|d|^2 / (2 std^2) - D (log std + log sqrt(2 pi))
        dims = diff.shape[1]
        sq_dist = torch.linalg.vector_norm(diff, dim=1).square()  # one read of diff (vecdot is slower on CPUs)
        log_prob = sq_dist.mul_(-0.5 / (std * std)).sub_(dims * (math.log(std) + _LOG_SQRT_2PI))
        if log_prob_reduction == "mean":
            log_prob = log_prob.div_(max(dims, 1))
    else:  # no density; NaN/inf inputs still surface
        log_prob = diff.sum(1).mul_(0.0)
    if not math.isfinite(float(log_prob.detach().sum())):  # one reduction: any NaN/inf element makes the sum non-finite
        _raise_non_finite(model_output, sample, prev_sample)
    shape = (batch,) + (1,) * (sample.ndim - 1)
    return StepOutput(
        prev_sample=prev_sample,
        mean=mean,
        std=torch.full(shape, std, dtype=dtype, device=x_t.device),
        log_prob=log_prob,
        x0_pred=x0,
        is_stochastic=torch.full((batch,), std > 0, device=x_t.device),
        next_timestep=torch.full((batch,), next_timestep, dtype=dtype, device=x_t.device),
    )


def _check_shapes(model_output: Tensor, sample: Tensor, prev_sample: Tensor | None) -> None:
    if sample.ndim < 1:
        raise ValueError("sample must have a leading batch dimension, shape (B, ...); got a 0-d tensor.")
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output shape {tuple(model_output.shape)} != sample shape {tuple(sample.shape)}; "
            "split off any learned-variance channels first (DDPM variance_type='learned*' is not supported)."
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}; "
            "pass the x_t' that this step produced."
        )


def _raise_non_finite(model_output: Tensor, sample: Tensor, prev_sample: Tensor) -> None:
    """Name the input and batch elements that made log_prob non-finite (runs only on failure)."""
    for name, tensor in (("sample", sample), ("model_output", model_output), ("prev_sample", prev_sample)):
        bad = (~torch.isfinite(tensor)).reshape(tensor.shape[0], -1).any(1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"{name} has NaN/inf at batch elements {bad[:10]}; densities are undefined there. "
                "Check the model/previous step (e.g. fp16 overflow) before stepping."
            )
    raise ValueError(
        "log_prob overflowed although all inputs are finite: std is too small for prev_sample's distance "
        "from the mean; check that prev_sample was produced by this (t, t') step."
    )


def _x0_eps(prediction_type: str, out: Tensor, x_t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model output, before any clipping (as diffusers' DDIM step does)."""
    p, q, e_x, e_o = prediction_coefficients(prediction_type, abar)
    return affine(p, x_t, q, out), affine(e_x, x_t, e_o, out)


def clips_x0(scheduler) -> bool:
    """Whether the scheduler clips or thresholds x0 (then the mean is not affine in the model output)."""
    return bool(getattr(scheduler.config, "thresholding", False) or getattr(scheduler.config, "clip_sample", False))


def _clip_x0(scheduler, x0: Tensor) -> Tensor:
    if scheduler.config.thresholding:
        return scheduler._threshold_sample(x0)  # pure, per-element dynamic thresholding
    if scheduler.config.clip_sample:
        bound = scheduler.config.clip_sample_range
        return x0.clamp(-bound, bound)
    return x0


def _draw_noise(shape, generator, device, dtype) -> Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for batch size {shape[0]}; pass one each.")
        draws = [torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator]
        return torch.stack(draws)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
