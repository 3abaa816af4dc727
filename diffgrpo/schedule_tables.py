"""Reading a diffusers scheduler's tables: which method a scheduler takes, t -> t', abar and sigma per step.

Why a module of its own: the step's formulas (``diffgrpo.step_rules``) need only numbers, and the
Gaussian step (``diffgrpo.sde``) only coefficients; what lies between is looking (t, t') up in the
scheduler's ``timesteps``, ``alphas_cumprod`` and ``sigmas`` tables, pure and batched, never through
a scheduler's stateful ``step()`` counter. :func:`step_coefficients` is the one place that does it,
for one call (``reverse_step``) or for a whole chain at once (``diffgrpo.chain.SamplingChain``).
Conventions (EgoAllo's k - 1 indexing, t' = -1 for "final", sigma = t / num_train_timesteps) are those of
``diffgrpo.sde``'s module docstring.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from diffgrpo.step_rules import StepCoefficients, ddpm_family_coefficients, flow_coefficients

Method = Literal["ddim", "ddpm", "egoallo", "flow_sde", "cps"]
DDPM_FAMILY_METHODS = ("ddim", "ddpm", "egoallo")
FLOW_METHODS = ("flow_sde", "cps")


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
