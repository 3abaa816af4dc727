"""The sampling chain as one value: scheduler, timesteps, sampler settings and exploration subspace.

Why one value: a reverse step's Gaussian (``diffgrpo.sde.reverse_step``) depends on the scheduler's
tables, the step's (t_k, t_{k+1}), the sampler settings (method, eta, SDE window, log-density
reduction) and where its noise lives (``diffgrpo.exploration``). Carried piecewise, these drift
apart: a chain sampled with one K and re-scored with another, a subspace rebuilt per call, a
sampler checked four times per start. A :class:`SamplingChain` is built, and checked, once
(:meth:`SamplingChain.build` runs :func:`check_sampler`), then handed to everything that samples
or re-scores (``rollout.rollout``, ``rollout.score_step``, ``probe``, ``evaluate``, the update).

Shapes: K steps, K+1 timesteps in sampling order (the noisiest first); S the sample shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffgrpo.config import SamplerConfig
from diffgrpo.exploration import ExplorationSubspace
from diffgrpo.schedule_tables import step_coefficients
from diffgrpo.sde import StepOutput, _clip_x0, clips_x0, fixed_step, reverse_step
from diffgrpo.step_rules import StepCoefficients


@dataclass(frozen=True)
class SamplingChain:
    """One sampling chain: K reverse steps of a scheduler, each a Gaussian policy (MotionGRPO section 4;
    Flow-GRPO's SDE for flow matching). Build it with :meth:`build` or :meth:`of`, never field by field:
    those check it."""

    scheduler: Any
    """A diffusers scheduler (DDIM/DDPM family or FlowMatchEulerDiscrete); only its tables are read."""
    timesteps: Tensor
    """(K+1,) the timesteps of the chain's states, the noisiest first; step k goes timesteps[k] -> [k+1]."""
    sampler: SamplerConfig
    """Step rule, eta, SDE window, log-density reduction, exploration subspace settings, guidance."""
    sample_shape: tuple[int, ...]
    """S, one sample's shape without the batch axis."""
    subspace: ExplorationSubspace | None
    """Where the stochastic steps put their noise (None: everywhere), built once for ``sample_shape``."""
    steps: tuple[StepCoefficients, ...] = field(init=False, repr=False, compare=False)
    """Per step k: its coefficients (``diffgrpo.step_rules``) as numbers, computed once in float64 when the
    chain is made, so that a step is only its arithmetic on the latents (:func:`step_with_logprob`)."""
    next_timesteps: tuple[float, ...] = field(init=False, repr=False, compare=False)
    """Per step k: the resolved t_{k+1} a step reports (``StepOutput.next_timestep``)."""
    clip_x0: Callable[[Tensor], Tensor] | None = field(init=False, repr=False, compare=False)
    """The scheduler's x0 clipping or thresholding (``clip_sample``/``thresholding``), None without."""

    def __post_init__(self) -> None:
        etas = torch.tensor([self.sampler.eta_at(k) for k in range(len(self.timesteps) - 1)], dtype=torch.float64)
        coef, resolved = step_coefficients(self.scheduler, self.timesteps[:-1], self.timesteps[1:], len(etas),
                                           method=self.sampler.method, eta=etas,
                                           egoallo_denominator_offset=self.sampler.egoallo_denominator_offset)
        object.__setattr__(self, "steps", tuple(coef.row(k) for k in range(len(etas))))
        object.__setattr__(self, "next_timesteps", tuple(resolved.tolist()))
        object.__setattr__(self, "clip_x0", functools.partial(_clip_x0, self.scheduler)
                           if clips_x0(self.scheduler) else None)

    @classmethod
    def build(cls, scheduler, timesteps: Tensor, sampler: SamplerConfig, sample_shape: tuple[int, ...], *,
              eta_flag: str = "--sampler.eta") -> SamplingChain:
        """The checked chain. Raises ValueError (before any data or model work) when a step is undefined
        for ``sampler`` (:func:`check_sampler`; ``eta_flag`` is the flag that sets eta in the running
        recipe) or the exploration subspace does not fit ``sample_shape``."""
        timesteps = torch.as_tensor(timesteps)
        check_sampler(scheduler, timesteps, sampler, eta_flag=eta_flag)
        shape = tuple(int(s) for s in sample_shape)
        return cls(scheduler=scheduler, timesteps=timesteps, sampler=sampler, sample_shape=shape,
                   subspace=sampler.exploration_subspace(shape))

    @classmethod
    def of(cls, task, sampler: SamplerConfig, *, eta_flag: str = "--sampler.eta") -> SamplingChain:
        """The chain of a :class:`diffgrpo.task.Task` (its scheduler, timesteps and sample shape) with ``sampler``."""
        return cls.build(task.make_scheduler(), task.sampling_timesteps(), sampler, task.sample_shape,
                         eta_flag=eta_flag)

    @property
    def num_steps(self) -> int:
        """K, the chain's reverse steps."""
        return len(self.timesteps) - 1

    def with_sample_shape(self, sample_shape: tuple[int, ...]) -> SamplingChain:
        """The same chain for samples shaped ``sample_shape`` (e.g. another window length), its subspace
        rebuilt; the steps are already checked (they do not depend on the shape)."""
        shape = tuple(int(s) for s in sample_shape)
        if shape == self.sample_shape:
            return self
        return dataclasses.replace(self, sample_shape=shape, subspace=self.sampler.exploration_subspace(shape))


def step_with_logprob(
    chain: SamplingChain,
    step: int,
    model_output: Tensor,
    x_t: Tensor,
    *,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """Take (``generator``) or score (``prev_sample``) step ``step`` (0 = the noisiest) of ``chain`` for
    the samples x_t (B, *S) given the network's ``model_output`` (B, *S).

    Why: sampling and re-scoring go through this one call, so the update re-scores a recorded step
    with the very numerics that sampled it (on-policy ratio exactly 1). The Gaussian is that of
    ``diffgrpo.sde.reverse_step`` at (t_k, t_{k+1}) with ``chain.sampler.eta_at(step)`` (equal to float32
    rounding), from the step's coefficients computed once when the chain was made
    (``diffgrpo.sde.fixed_step``: no table lookups or formulas per call); with an exploration subspace it
    is ``reverse_step`` itself.
    """
    sampler = chain.sampler
    if chain.subspace is not None:  # noise in a subspace: the general step (its eta = 0 part is a second mean)
        n = x_t.shape[0]
        return reverse_step(
            chain.scheduler, model_output, chain.timesteps[step].expand(n), x_t, eta=sampler.eta_at(step),
            prev_sample=prev_sample, generator=generator, next_timestep=chain.timesteps[step + 1].expand(n),
            method=sampler.method, log_prob_reduction=sampler.log_prob_reduction,
            egoallo_denominator_offset=sampler.egoallo_denominator_offset, subspace=chain.subspace,
        )
    return fixed_step(chain.steps[step], model_output, x_t, next_timestep=chain.next_timesteps[step],
                      prev_sample=prev_sample, generator=generator, log_prob_reduction=sampler.log_prob_reduction,
                      clip_x0=chain.clip_x0)


def check_sampler(scheduler, timesteps: Tensor, sampler: SamplerConfig, *,
                  eta_flag: str = "--sampler.eta") -> None:
    """Raise now, before any data or model work, if a step of the chain is undefined for ``sampler``.

    Why: an eta too large for the schedule (e.g. EgoAllo's step above ~0.97 on the ego-motion chain),
    a method of the wrong scheduler family or a timestep outside the scheduler's table would otherwise
    fail at the first rollout step, minutes into a run. Every step (t_k, t_{k+1}) is taken once on a
    one-element dummy sample with a zero model output: the same code path the rollout runs, so the
    same errors, at no cost. For an eta-dependent failure the message gives the largest eta that
    passes (to 1e-3) and names ``eta_flag``, the flag that sets it in the caller's recipe.
    """
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of K+1 >= 2 values, got shape {tuple(timesteps.shape)}")
    num_steps = len(timesteps) - 1
    if sampler.sde_window is not None and sampler.sde_window[1] > num_steps:
        raise ValueError(f"sampler.sde_window={sampler.sde_window} ends after the chain's K={num_steps} steps; use "
                         f"0 <= START < END <= {num_steps}")
    if sampler.sde_window is not None and sampler.eta == 0:
        raise ValueError("sampler.sde_window is set but sampler.eta = 0, so no step is stochastic; raise eta")

    def first_error(eta: float) -> ValueError | None:
        zeros = torch.zeros(1, 1, dtype=torch.float64)
        for k in range(len(timesteps) - 1):
            if sampler.eta_at(k) == 0 and sampler.sde_window is not None:
                eta_k = 0.0  # outside the SDE window the step is deterministic whatever eta is
            else:
                eta_k = eta
            try:
                reverse_step(scheduler, zeros, timesteps[k], zeros, eta=eta_k, prev_sample=zeros,
                                  next_timestep=timesteps[k + 1], method=sampler.method,
                                  log_prob_reduction=sampler.log_prob_reduction,
                                  egoallo_denominator_offset=sampler.egoallo_denominator_offset)
            except ValueError as error:
                return ValueError(f"step {k} ({timesteps[k].item()} -> {timesteps[k + 1].item()}): {error}")
        return None

    error = first_error(sampler.eta)
    if error is None:
        return
    if sampler.eta > 0 and first_error(0.0) is None:
        low, high = 0.0, sampler.eta
        while high - low > 1e-3:
            mid = 0.5 * (low + high)
            low, high = (mid, high) if first_error(mid) is None else (low, mid)
        raise ValueError(f"sampler.eta={sampler.eta} is too large for method {sampler.method!r} on this schedule: "
                         f"valid range 0 <= eta <= {low:.3f}. Lower {eta_flag}. "
                         f"First failing {error}") from None
    raise error
