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
from diffgrpo.step_rules import (
    StepCoefficients,
    ddpm_family_coefficients,
    flow_coefficients,
    prediction_coefficients,
)

Method = Literal["ddim", "ddpm", "egoallo", "flow_sde", "cps"]
Reduction = Literal["sum", "mean"]
DDPM_FAMILY_METHODS = ("ddim", "ddpm", "egoallo")
FLOW_METHODS = ("flow_sde", "cps")
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
        mean, x0 = torch.addcmul(mean, view(coef.mean_x0), clipped - x0), clipped
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


def step_coefficients(
    scheduler, timestep, next_timestep, batch: int, *, method: Method | None, eta: float | Tensor,
    egoallo_denominator_offset: float = 0.1,
) -> tuple[StepCoefficients, Tensor]:
    """The coefficients of ``batch`` steps t -> t' (``diffgrpo.step_rules``) and the resolved t' ((B,) float64).

    ``timestep``/``next_timestep`` as in :func:`reverse_step`; ``eta`` a number or a (B,) tensor (one per
    step, e.g. a chain's steps inside and outside its SDE window); ``method=None``: the scheduler's default.
    The one place that reads the schedule's tables.
    """
    method = _default_method(scheduler) if method is None else method
    family = _check_method(scheduler, method)
    if family == "ddpm":
        t, t_next = _resolve_ddpm_timesteps(scheduler, timestep, next_timestep, batch)
        abar_t, abar_next, abar_prev1 = _alpha_bars(scheduler, t, t_next)  # (B,) float64, CPU
        coef = ddpm_family_coefficients(method, scheduler.config.prediction_type, abar_t, abar_next, abar_prev1, eta,
                                        egoallo_denominator_offset)
        return coef, t_next.to(torch.float64)
    sigma, sigma_next = _resolve_flow_sigmas(scheduler, timestep, next_timestep, batch)
    return flow_coefficients(method, sigma, sigma_next, eta), sigma_next * scheduler.config.num_train_timesteps


def affine(a: Tensor | float, x: Tensor, b: Tensor | float, y: Tensor) -> Tensor:
    """a x + b y in two passes over the latents (one when a = 1); a, b numbers or tensors broadcasting to x."""
    if isinstance(b, Tensor):
        return torch.addcmul(x * a, b, y)
    return torch.add(x if isinstance(a, float) and a == 1.0 else x * a, y, alpha=b)


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
    mean (2 passes), x0 (1), the noise draw and x_{t'} (2), and the squared distance for the density (2).
    Same Gaussian as :func:`reverse_step` (to float32 rounding) and the same noise draws, so a chain
    sampled here and re-scored here reproduces its log-probabilities exactly. ``clip_x0``: the scheduler's
    x0 clipping (``_clip_x0`` bound to it) or None. ``next_timestep``: the resolved t' to report.
    """
    _check_shapes(model_output, sample, prev_sample)
    batch = sample.shape[0]
    dtype = torch.float64 if torch.float64 in (sample.dtype, model_output.dtype) else torch.float32
    x_t, out = sample.to(dtype), model_output.to(dtype)
    x0 = affine(coef.x0_x_t, x_t, coef.x0_out, out)
    mean = affine(coef.mean_x_t, x_t, coef.mean_out, out)
    if clip_x0 is not None:
        clipped = clip_x0(x0)
        mean, x0 = torch.add(mean, clipped - x0, alpha=coef.mean_x0), clipped
    std = coef.std
    if prev_sample is None:
        noise = _draw_noise(sample.shape, generator, x_t.device, dtype)
        prev_sample = torch.add(mean, noise, alpha=std).to(sample.dtype)
    diff = (prev_sample.to(dtype) - mean).reshape(batch, -1)
    if std > 0:  # gaussian_log_prob with one std for all: -|d|^2 / (2 std^2) - D (log std + log sqrt(2 pi))
        dims = diff.shape[1]
        log_prob = torch.linalg.vecdot(diff, diff).mul_(-0.5 / (std * std)).sub_(dims * (math.log(std) + _LOG_SQRT_2PI))
        if log_prob_reduction == "mean":
            log_prob = log_prob.div_(max(dims, 1))
    else:  # no density; NaN/inf inputs still surface
        log_prob = diff.sum(1).mul_(0.0)
    if not bool(torch.isfinite(log_prob).all()):
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


def _default_method(scheduler: object) -> Method:
    if isinstance(scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(scheduler, DDPMScheduler):
        return "ddpm"
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return "flow_sde"
    raise ValueError(
        f"unsupported scheduler {type(scheduler).__name__}; use DDIMScheduler, DDPMScheduler or "
        "FlowMatchEulerDiscreteScheduler (their tables are what the densities are read from)."
    )


def _check_method(scheduler: object, method: str) -> Literal["ddpm", "flow"]:
    family = "flow" if _default_method(scheduler) == "flow_sde" else "ddpm"
    allowed = FLOW_METHODS if family == "flow" else DDPM_FAMILY_METHODS
    if method not in DDPM_FAMILY_METHODS + FLOW_METHODS:
        raise ValueError(f"unknown method {method!r}; known: {DDPM_FAMILY_METHODS + FLOW_METHODS}.")
    if method not in allowed:
        raise ValueError(
            f"method {method!r} does not apply to {type(scheduler).__name__}; pass one of {allowed} "
            "or use a scheduler of the matching family."
        )
    variance_type = getattr(scheduler.config, "variance_type", "fixed_small")
    if method == "ddpm" and variance_type not in ("fixed_small", "fixed_small_log"):
        raise ValueError(
            f"method 'ddpm' is the exact posterior (variance_type='fixed_small') but the scheduler has "
            f"variance_type={variance_type!r}; build it with variance_type='fixed_small' or use 'ddim'."
        )
    if family == "flow" and scheduler.config.invert_sigmas:
        raise ValueError("invert_sigmas=True (sigma rising 0 -> 1) is not supported; build the scheduler "
                         "with invert_sigmas=False.")
    return family


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


def _as_batch(value: int | float | Tensor, batch: int, name: str) -> Tensor:
    """Scalar or (B,) -> (B,) float64 on CPU (schedule lookups are tiny and the tables live on CPU)."""
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tensor.numel() == 1:
        return tensor.reshape(1).expand(batch).clone()
    if tensor.shape != (batch,):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; pass a scalar or a ({batch},) tensor.")
    return tensor


def _resolve_ddpm_timesteps(scheduler, timestep, next_timestep, batch: int) -> tuple[Tensor, Tensor]:
    """(t, t') as (B,) int64 on CPU; t' = -1 marks the final step."""
    t = _as_batch(timestep, batch, "timestep")
    num_train = scheduler.alphas_cumprod.shape[0]
    if bool((t != t.round()).any()) or bool(((t < 0) | (t >= num_train)).any()):
        raise ValueError(f"timestep {t.tolist()[:8]} must be integers in [0, {num_train - 1}] (they index "
                         "alphas_cumprod; EgoAllo's k is diffusers' k - 1).")
    t = t.long()
    if next_timestep is not None:
        t_next = _as_batch(next_timestep, batch, "next_timestep")
        if bool((t_next != t_next.round()).any()):
            raise ValueError(f"next_timestep {t_next.tolist()[:8]} must be integers (-1 = final).")
        t_next = t_next.long().clamp_min(-1)
    elif isinstance(scheduler, DDIMScheduler) and scheduler.num_inference_steps is None:
        raise ValueError(
            "DDIMScheduler has no num_inference_steps; call set_timesteps(n) or pass next_timestep."
        )
    elif isinstance(scheduler, DDIMScheduler) or scheduler.custom_timesteps or scheduler.num_inference_steps:
        t_next = _next_in_table(scheduler.timesteps, t)
    else:  # DDPMScheduler before set_timesteps walks every training step, as its previous_timestep() does
        t_next = t - 1
    if bool((t_next > t).any()):
        raise ValueError("next_timestep must not be noisier than timestep (t' <= t); reverse steps go down.")
    return t, t_next


def _next_in_table(timesteps: Tensor, t: Tensor) -> Tensor:
    """The entry after each t in the scheduler's `timesteps` table, -1 (final) after its last entry.

    Why the table and never t - T // n: "linspace" and "trailing" spacings (and custom tables) are not
    evenly spaced by T // n, so arithmetic silently pairs x_t with the wrong abar' (linspace, n = 10:
    999 -> 899 instead of 888, and 111 -> 11 instead of 0).
    """
    table = timesteps.detach().to("cpu").long()  # (N,)
    hits = t[:, None] == table[None, :]  # (B, N)
    count = hits.sum(1)
    if bool((count != 1).any()):
        missing = sorted(set(t[count != 1].tolist()))[:8]
        raise ValueError(
            f"timestep {missing} is not (exactly once) in scheduler.timesteps {table.tolist()[:8]}..., so "
            "its next timestep is unknown; pass next_timestep explicitly (or step on the table's entries)."
        )
    index = hits.long().argmax(1) + 1  # (B,)
    return torch.where(index < table.shape[0], table[index.clamp_max(table.shape[0] - 1)], -1)


def _alpha_bars(scheduler, t: Tensor, t_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """abar_t, abar_{t'} and abar_{t-1} (EgoAllo's single-step value) as (B,) float64 on CPU."""
    table = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
    final = scheduler.final_alpha_cumprod if isinstance(scheduler, DDIMScheduler) else torch.tensor(1.0)
    final = final.detach().to("cpu", torch.float64)

    def lookup(index: Tensor) -> Tensor:
        return torch.where(index >= 0, table[index.clamp_min(0)], final)

    return lookup(t), lookup(t_next), lookup(t - 1)


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


def _resolve_flow_sigmas(scheduler, timestep, next_timestep, batch: int) -> tuple[Tensor, Tensor]:
    """(sigma, sigma') as (B,) float64 on CPU, with 0 <= sigma' <= sigma <= 1."""
    num_train = scheduler.config.num_train_timesteps
    t = _as_batch(timestep, batch, "timestep")
    sigma = t / num_train
    if next_timestep is not None:
        sigma_next = _as_batch(next_timestep, batch, "next_timestep") / num_train
    else:
        if scheduler.num_inference_steps is None:
            raise ValueError("FlowMatchEulerDiscreteScheduler has no schedule yet; call set_timesteps(n) or "
                             "pass next_timestep.")
        table_t = scheduler.timesteps.detach().to("cpu", torch.float64)
        table_sigma = scheduler.sigmas.detach().to("cpu", torch.float64)
        hits = (t[:, None] - table_t[None, :]).abs() <= 1e-5 * num_train  # (B, N)
        count = hits.sum(1)
        if bool((count != 1).any()):
            bad = sorted(set(t[count != 1].tolist()))[:8]
            raise ValueError(f"timestep {bad} is missing from, or repeated in, scheduler.timesteps, so the "
                             "next sigma is ambiguous; pass next_timestep explicitly.")
        index = hits.long().argmax(1)
        inconsistent = bool(((table_sigma[index] - sigma).abs() > 1e-5).any())
        if inconsistent or table_sigma.shape[0] <= int(index.max()) + 1:
            raise ValueError(
                "scheduler.timesteps and scheduler.sigmas disagree (timesteps set without sigmas?) "
                "or no next sigma exists; pass next_timestep explicitly."
            )
        sigma_next = table_sigma[index + 1]
    if bool(((sigma < 0) | (sigma > 1 + 1e-6) | (sigma_next < 0) | (sigma_next > sigma + 1e-9)).any()):
        raise ValueError("need 0 <= next_timestep <= timestep <= num_train_timesteps for flow matching "
                         "(sigma falls from 1 to 0).")
    return sigma.clamp(0, 1), sigma_next.clamp(0, 1)


def _draw_noise(shape, generator, device, dtype) -> Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for batch size {shape[0]}; pass one each.")
        draws = [torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator]
        return torch.stack(draws)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)
