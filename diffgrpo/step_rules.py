"""Each method's reverse step as coefficients of an affine map of (x_t, model output): one home per formula.

Why coefficients: once (t, t') is fixed, every supported step is affine in the sample x_t and the model
output (eps, x0, v or velocity): mean = a x_t + b out, x0 = p x_t + q out, std a number. The numbers depend
only on the schedule, so a sampling chain computes them once, in float64, for all its K steps
(``diffgrpo.chain.SamplingChain``), and a step then costs two passes over the latents for the mean instead
of the dozens of elementwise passes (and the table lookups) of evaluating the formulas per call. A scheduler
that clips or thresholds x0 makes the mean depend on clip(x0): the coefficient ``mean_x0`` (the weight of x0
in the mean) carries that correction, mean = a x_t + b out + mean_x0 (clip(x0) - x0).

Symbols: abar = ``alphas_cumprod`` at t, abar' at t'; sigma, sigma' flow-matching noise levels
(x_t = (1 - sigma) x0 + sigma x1, the model predicts v = x1 - x0); eta the stochasticity.
All functions take (B,) float64 tensors (one value per batch element or per chain step) and return the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepCoefficients:
    """mean = mean_x_t x_t + mean_out out (+ mean_x0 (clip(x0) - x0)), x0 = x0_x_t x_t + x0_out out, std.

    Each field is a (B,) float64 tensor, or a Python float for one step of a chain (:meth:`row`)."""

    mean_x_t: Tensor | float
    mean_out: Tensor | float
    mean_x0: Tensor | float
    """The weight of x0 in the mean (0 for flow matching, which never clips)."""
    x0_x_t: Tensor | float
    x0_out: Tensor | float
    std: Tensor | float
    """The step's standard deviation; 0 for a deterministic step."""

    def row(self, index: int) -> StepCoefficients:
        """Element ``index`` as Python floats (what a chain stores per step)."""
        return StepCoefficients(*(float(getattr(self, name)[index]) for name in self.__dataclass_fields__))


def prediction_coefficients(prediction_type: str, alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(p, q, e_x, e_o) with x0 = p x_t + q out and eps = e_x x_t + e_o out, from
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (DDPM eq. 4) and, for "v_prediction",
    v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, section 4)."""
    root, root_one_minus = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return 1.0 / root, -root_one_minus / root, torch.zeros_like(root), torch.ones_like(root)
    if prediction_type == "sample":
        safe = (1.0 - alpha_bar).clamp_min(1e-20).sqrt()
        return torch.zeros_like(root), torch.ones_like(root), 1.0 / safe, -root / safe
    if prediction_type == "v_prediction":
        return root, -root_one_minus, root_one_minus, root
    raise ValueError(f"prediction_type={prediction_type!r} must be 'epsilon', 'sample' or 'v_prediction'.")


def posterior_variance(alpha_bar_t: Tensor, alpha_bar_next: Tensor) -> Tensor:
    """Variance of q(x_{t'} | x_t, x0) for t' < t: (1 - abar')/(1 - abar) * (1 - abar/abar').

    DDIM eq. (16) with eta = 1; also DDPM's "fixed_small" variance and EgoAllo's single-step std^2.
    """
    one_minus = 1.0 - alpha_bar_t
    safe = torch.where(one_minus > 0, one_minus, torch.ones_like(one_minus))
    var = (1.0 - alpha_bar_next) / safe * (1.0 - alpha_bar_t / alpha_bar_next)
    return torch.where(one_minus > 0, var, torch.zeros_like(var)).clamp_min(0.0)


def ddim_coefficients(alpha_bar_next: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """(sqrt(abar'), sqrt(1 - abar' - std^2)): mean = c_x0 x0 + c_eps eps (DDIM eq. 12).

    Why one home: ddim, ddpm and egoallo all use this mean; the DDPM posterior is it with std^2 = the
    posterior variance and eps = (x_t - sqrt(abar) x0)/sqrt(1 - abar), EgoAllo's with its own std and
    eps denominator sqrt(1 - abar + offset). Call it on float64 schedule values: 1 - abar' cancels badly
    in float32 near t = 0.
    """
    radicand = 1.0 - alpha_bar_next - std.square()
    if bool((radicand < -1e-9).any()):
        raise ValueError(
            "std^2 exceeds 1 - abar_next for some elements (no variance left for the eps direction); "
            "lower eta or use adjacent timesteps."
        )
    return alpha_bar_next.sqrt(), radicand.clamp_min(0.0).sqrt()


def ddpm_family_coefficients(method: str, prediction_type: str, alpha_bar_t: Tensor, alpha_bar_next: Tensor,
                             alpha_bar_t_minus_1: Tensor, eta: Tensor | float,
                             egoallo_denominator_offset: float) -> StepCoefficients:
    """The ddim / ddpm / egoallo steps (see ``diffgrpo.sde.reverse_step`` for each method's definition).

    ddim: std = eta sqrt(posterior_variance), mean = DDIM eq. (12) with the model's eps. ddpm and egoallo
    rewrite eps = (x_t - sqrt(abar) x0) / d (d = sqrt(1 - abar), EgoAllo's d = sqrt(1 - abar + offset)),
    so their mean weighs x0 and x_t; the fold is done here in float64, which keeps the mean accurate near
    t = 0 where x_t - sqrt(abar) x0 is tiny.
    """
    p, q, e_x, e_o = prediction_coefficients(prediction_type, alpha_bar_t)
    if method == "ddim":
        std = eta * posterior_variance(alpha_bar_t, alpha_bar_next).sqrt()
        c_x0, c_eps = ddim_coefficients(alpha_bar_next, std)
        return StepCoefficients(c_x0 * p + c_eps * e_x, c_x0 * q + c_eps * e_o, c_x0, p, q, std)
    if method == "ddpm":
        mean_std = posterior_variance(alpha_bar_t, alpha_bar_next).sqrt()  # the mean is always eta = 1's
        std, denominator = eta * mean_std, (1.0 - alpha_bar_t).clamp_min(1e-20).sqrt()
    elif method == "egoallo":  # single-step std at t; a step into abar' = 1 has no noise budget left
        std = eta * posterior_variance(alpha_bar_t, alpha_bar_t_minus_1).sqrt()
        std = mean_std = torch.where(alpha_bar_next >= 1.0, torch.zeros_like(std), std)
        denominator = (1.0 - alpha_bar_t + egoallo_denominator_offset).sqrt()
    else:
        raise ValueError(f"method={method!r} is not one of 'ddim', 'ddpm', 'egoallo'")
    c_x0, c_eps = ddim_coefficients(alpha_bar_next, mean_std)
    c_x0 = c_x0 - c_eps * alpha_bar_t.sqrt() / denominator  # mean = c_x0 x0 + c_x_t x_t
    c_x_t = c_eps / denominator
    return StepCoefficients(c_x0 * p + c_x_t, c_x0 * q, c_x0, p, q, std)


def flow_sde_coefficients(sigma: Tensor, sigma_next: Tensor, eta: Tensor | float) -> StepCoefficients:
    """Flow-GRPO's SDE step (Liu et al. 2025, the Euler-Maruyama step of its reverse SDE):
    s = eta sqrt(sigma/(1-sigma)), dt = sigma' - sigma,
    mean = x + dt (v + s^2/(2 sigma) (x + (1-sigma) v)), std = s sqrt(-dt); as coefficients,
    mean = (1 + dt s^2/(2 sigma)) x + dt (1 + s^2 (1-sigma)/(2 sigma)) v.

    At sigma = 1 the factor 1/(1 - sigma) is infinite, so 1 - sigma' (the step's target) is used in its place
    there. A step with dt = 0 is the identity; a step into sigma' = 0 lands deterministically on
    x0 = x - sigma v (no noise level is left to hold noise).
    """
    dt = sigma_next - sigma
    degenerate = (dt >= 0) | (sigma_next <= 0)
    safe_sigma = torch.where(degenerate, torch.full_like(sigma, 0.5), sigma)
    one_minus = torch.where(safe_sigma >= 1, 1.0 - sigma_next, 1.0 - safe_sigma)
    one_minus = torch.where(degenerate | (one_minus <= 0), torch.full_like(one_minus, 0.5), one_minus)
    s = eta * (safe_sigma / one_minus).sqrt()
    safe_dt = torch.where(degenerate, torch.full_like(dt, -0.5), dt)
    drift = s.square() / (2.0 * safe_sigma)
    one = torch.ones_like(sigma)
    mean_x = torch.where(degenerate, one, 1.0 + safe_dt * drift)
    mean_v = torch.where(degenerate, torch.where(dt >= 0, torch.zeros_like(sigma), -sigma),
                         safe_dt * (1.0 + drift * (1.0 - safe_sigma)))
    std = torch.where(degenerate, torch.zeros_like(s), s * (-safe_dt).sqrt())
    return StepCoefficients(mean_x, mean_v, torch.zeros_like(sigma), one, -sigma, std)


def cps_coefficients(sigma: Tensor, sigma_next: Tensor, eta: Tensor | float) -> StepCoefficients:
    """Coefficients-preserving sampling (CPS, 2025): std = sigma' sin(eta pi/2),
    mean = (1 - sigma') x0 + sqrt(sigma'^2 - std^2) x1 with x0 = x - sigma v, x1 = x + (1 - sigma) v,
    so x_{t'} keeps the noise level sigma' exactly."""
    std = sigma_next * torch.sin(torch.as_tensor(eta, dtype=sigma.dtype) * (math.pi / 2.0))
    c_x1 = (sigma_next.square() - std.square()).clamp_min(0.0).sqrt()
    c_x0 = 1.0 - sigma_next
    return StepCoefficients(c_x0 + c_x1, -c_x0 * sigma + c_x1 * (1.0 - sigma), torch.zeros_like(sigma),
                            torch.ones_like(sigma), -sigma, std)


def flow_coefficients(method: str, sigma: Tensor, sigma_next: Tensor, eta: Tensor | float) -> StepCoefficients:
    """``flow_sde`` or ``cps``."""
    if method == "flow_sde":
        return flow_sde_coefficients(sigma, sigma_next, eta)
    if method == "cps":
        return cps_coefficients(sigma, sigma_next, eta)
    raise ValueError(f"method={method!r} is not one of 'flow_sde', 'cps'")
