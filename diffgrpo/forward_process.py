"""The forward process q(x_t | x0) of a diffusers scheduler, and the model's parametrisation around it.

Why: the forward-process objectives (DiffusionNFT, advantage-weighted matching; ``diffgrpo.nft``,
``diffgrpo.awm``) never replay the sampler. They take the clean samples x0 a rollout produced, noise
them afresh at sampled t and regress the model's prediction there, exactly as pretraining does. So
they need the noising, the training target of each parametrisation, and the map between a
prediction and its clean-sample estimate, all as pure batched functions of (x0, noise, t) that only
*read* the scheduler's tables (never its stateful ``step``).

Every supported process is x_t = alpha_t x0 + sigma_t eps, eps ~ N(0, I):
- DDPM family (``DDPMScheduler``, ``DDIMScheduler``): alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
  abar = ``alphas_cumprod`` indexed by the integer training timestep t in [0, T - 1] (DDPM eq. 4).
- Flow matching (``FlowMatchEulerDiscreteScheduler``): sigma = t / T, alpha = 1 - sigma
  (rectified flow; t in [0, T], T = ``num_train_timesteps``, as ``diffgrpo.sde`` reads it).

Parametrisations (what the model outputs, and its pretraining target given x0 and eps):
- "sample":       x0.                                           (DDPM family)
- "epsilon":      eps (DDPM eq. 14).                            (DDPM family)
- "v_prediction": v = alpha eps - sigma x0 (Salimans & Ho 2022, "Progressive distillation", sec. 4),
                  diffusers' ``get_velocity``.                  (DDPM family)
- "velocity":     u = eps - x0, the flow-matching velocity dx_t/dsigma (Lipman et al. 2023; Liu et al.
                  2023), what flow schedulers' models predict.  (flow)

At fixed (x_t, t) the clean-sample estimate is affine in the prediction, x0_hat = a_t x_t + b_t f.
So a mixture of predictions whose weights sum to 1 (DiffusionNFT's implicit policies) has as its
x0 estimate the same mixture of the x0 estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from jaxtyping import Float, Real
from torch import Tensor
from typing_extensions import assert_never

from diffgrpo.sde import _x0_eps

Family = Literal["ddpm", "flow"]
PredictionType = Literal["sample", "epsilon", "v_prediction", "velocity"]
DDPM_PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")


@dataclass(frozen=True)
class TimestepSampling:
    """Where on the forward process the objectives are trained: the distribution of t.

    uniform: the pretraining distribution. DDPM family: t uniform on the integers
      [ceil(low (T - 1)), floor(high (T - 1))] (DDPM Algorithm 1 with low = 0, high = 1). Flow: the
      noise level sigma uniform on (low, high] (so sigma = 0, where x_t carries no noise and "velocity"
      is undetermined by x_t, is never drawn), t = sigma T.
    table: uniform over the entries of ``scheduler.timesteps`` (the sampler's grid, after
      ``set_timesteps``) whose noise fraction (t / (T - 1) for DDPM, sigma for flow) lies in
      [low, high]: DiffusionNFT trains at the sampler's own timesteps (Zheng et al. 2025). The grid is
      read by ``ForwardProcess.from_scheduler``: call ``set_timesteps`` before it.
    """

    distribution: Literal["uniform", "table"] = "uniform"
    low: float = 0.0
    """Lowest noise fraction, in [0, 1)."""
    high: float = 1.0
    """Highest noise fraction, in (low, 1]."""

    def __post_init__(self) -> None:
        if self.distribution not in ("uniform", "table"):
            raise ValueError(f"distribution={self.distribution!r} is not one of 'uniform', 'table'")
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1 (noise fractions), got low={self.low}, high={self.high}")


@dataclass(frozen=True)
class NoisedBatch:
    """x0 noised at one t per element: x_t = alpha_t x0 + sigma_t noise. Frozen so x_t cannot drift from (x0, t)."""

    x0: Float[Tensor, "N ..."]
    """The clean samples (a rollout's outputs), detached."""
    noise: Float[Tensor, "N ..."]
    """eps ~ N(0, I), same shape as x0."""
    timesteps: Real[Tensor, " N"]
    """t per element in the scheduler's units (integer-valued for the DDPM family)."""
    x_t: Float[Tensor, "N ..."]


@dataclass(frozen=True)
class ForwardProcess:
    """q(x_t | x0) and the model's parametrisation, read once from a scheduler (``from_scheduler``)."""

    family: Family
    prediction_type: PredictionType
    num_train_timesteps: int
    alphas_cumprod: Tensor | None
    """(T,) float64 on CPU for the DDPM family; None for flow matching."""
    timestep_table: Tensor
    """``scheduler.timesteps`` as float64 on CPU (the sampler's grid; TimestepSampling 'table')."""

    @classmethod
    def from_scheduler(
        cls, scheduler: DDPMScheduler | DDIMScheduler | FlowMatchEulerDiscreteScheduler
    ) -> ForwardProcess:
        """Read the tables. Raises ValueError for other schedulers, unknown prediction types and
        flow schedulers with ``invert_sigmas=True``."""
        if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler)):
            raise ValueError(f"unsupported scheduler {type(scheduler).__name__}; use DDPMScheduler, DDIMScheduler or "
                             "FlowMatchEulerDiscreteScheduler")
        table = torch.as_tensor(scheduler.timesteps).detach().to("cpu", torch.float64)
        if isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            prediction_type = scheduler.config.prediction_type
            if prediction_type not in DDPM_PREDICTION_TYPES:
                raise ValueError(f"prediction_type={prediction_type!r} is not one of {DDPM_PREDICTION_TYPES}; "
                                 "build the scheduler with one of them")
            abar = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
            return cls("ddpm", prediction_type, int(abar.shape[0]), abar, table)
        if scheduler.config.invert_sigmas:
            raise ValueError("invert_sigmas=True (sigma rising 0 -> 1) is not supported; build the scheduler "
                             "with invert_sigmas=False")
        return cls("flow", "velocity", int(scheduler.config.num_train_timesteps), None, table)

    def noise_fraction(self, timesteps: Tensor) -> Tensor:
        """t as a fraction of the noise range, float64 on CPU: t / (T - 1) (DDPM family) or sigma = t / T (flow)."""
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64)
        return t / (self.num_train_timesteps - 1) if self.family == "ddpm" else t / self.num_train_timesteps

    def coefficients(self, timesteps: Real[Tensor, " N"]) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) as (N,) float64 on CPU, so x_t = alpha_t x0 + sigma_t eps.

        Raises ValueError for t outside [0, T - 1] or not integer (DDPM family: t indexes
        ``alphas_cumprod``), or outside [0, T] (flow).
        """
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
        if self.family == "ddpm":
            last = self.num_train_timesteps - 1
            if bool(((t != t.round()) | (t < 0) | (t > last)).any()):
                raise ValueError(f"timesteps {t.tolist()[:8]} must be integers in [0, {last}] (they index "
                                 "alphas_cumprod)")
            abar = self.alphas_cumprod[t.long()]
            return abar.sqrt(), (1.0 - abar).sqrt()
        if bool(((t < 0) | (t > self.num_train_timesteps)).any()):
            raise ValueError(f"timesteps {t.tolist()[:8]} must lie in [0, {self.num_train_timesteps}] "
                             "(sigma = t / num_train_timesteps)")
        sigma = t / self.num_train_timesteps
        return 1.0 - sigma, sigma

    def sample_timesteps(
        self, n: int, generator: torch.Generator, sampling: TimestepSampling | None = None
    ) -> Real[Tensor, " n"]:
        """n independent timesteps (one per element) drawn as ``sampling`` says, on the generator's device.

        DDPM family: int64 values; flow: float32 values in (low T, high T]. The draw consumes
        ``generator`` only, so a seeded generator reproduces it exactly.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r} must be an int >= 1")
        sampling = TimestepSampling() if sampling is None else sampling
        device = generator.device
        if sampling.distribution == "table":
            fraction = self.noise_fraction(self.timestep_table)
            candidates = self.timestep_table[(fraction >= sampling.low) & (fraction <= sampling.high)]
            if candidates.numel() == 0:
                raise ValueError(f"no entry of scheduler.timesteps has a noise fraction in [{sampling.low}, "
                                 f"{sampling.high}]; widen the range or call set_timesteps first")
            index = torch.randint(candidates.numel(), (n,), generator=generator, device=device)
            picked = candidates.to(device)[index]
            return picked.long() if self.family == "ddpm" else picked.float()
        if sampling.distribution == "uniform":
            if self.family == "ddpm":
                last = self.num_train_timesteps - 1
                lo, hi = math.ceil(sampling.low * last), math.floor(sampling.high * last)
                if lo > hi:
                    raise ValueError(f"no integer timestep in [{sampling.low}, {sampling.high}] x {last}; widen it")
                return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            sigma = sampling.high - (sampling.high - sampling.low) * u  # in (low, high]
            return (sigma * self.num_train_timesteps).float()
        assert_never(sampling.distribution)

    def add_noise(
        self, x0: Float[Tensor, "N ..."], noise: Float[Tensor, "N ..."], timesteps: Real[Tensor, " N"]
    ) -> Float[Tensor, "N ..."]:
        """x_t = alpha_t x0 + sigma_t noise (DDPM eq. 4; the rectified-flow interpolation), in x0's dtype."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have x0's shape {tuple(x0.shape)}")
        alpha, sigma = self._broadcast(self.coefficients(timesteps), x0)
        return (alpha * x0 + sigma * noise).to(x0.dtype)

    def training_target(
        self, x0: Float[Tensor, "N ..."], noise: Float[Tensor, "N ..."], timesteps: Real[Tensor, " N"]
    ) -> Float[Tensor, "N ..."]:
        """The pretraining regression target of the model's parametrisation at x_t = add_noise(x0, noise, t).

        The model minimising E ||f(x_t, t) - target||^2 outputs E[target | x_t], which is what the
        sampler expects of it (DDPM eq. 14; flow matching's conditional velocity).
        """
        alpha, sigma = self._broadcast(self.coefficients(timesteps), x0)
        x0_c, noise_c = x0.to(alpha.dtype), noise.to(alpha.dtype)
        if self.prediction_type == "sample":
            target = x0_c
        elif self.prediction_type == "epsilon":
            target = noise_c
        elif self.prediction_type == "v_prediction":
            target = alpha * noise_c - sigma * x0_c
        elif self.prediction_type == "velocity":
            target = noise_c - x0_c
        else:
            assert_never(self.prediction_type)
        return target

    def prediction_to_x0(
        self, prediction: Float[Tensor, "N ..."], x_t: Float[Tensor, "N ..."], timesteps: Real[Tensor, " N"]
    ) -> Float[Tensor, "N ..."]:
        """The clean-sample estimate x0_hat a prediction implies at (x_t, t); differentiable in ``prediction``.

        DDPM family: ``diffgrpo.sde``'s conversion (no clipping). Flow: x0_hat = x_t - sigma u.
        Computed in float32 (float64 if an input is float64).
        """
        _check_same_shape(prediction, x_t, "prediction")
        alpha, sigma = self._broadcast(self.coefficients(timesteps), prediction, x_t)
        pred_c, x_t_c = prediction.to(alpha.dtype), x_t.to(alpha.dtype)
        if self.family == "ddpm":
            return _x0_eps(self.prediction_type, pred_c, x_t_c, alpha.square())[0]
        return x_t_c - sigma * pred_c

    def x0_to_prediction(
        self, x0_hat: Float[Tensor, "N ..."], x_t: Float[Tensor, "N ..."], timesteps: Real[Tensor, " N"]
    ) -> Float[Tensor, "N ..."]:
        """The prediction in the model's parametrisation that implies ``x0_hat`` at (x_t, t).

        Inverse of :meth:`prediction_to_x0`: epsilon = (x_t - alpha x0)/sigma, v = (alpha x_t - x0)/sigma
        (using alpha^2 + sigma^2 = 1), velocity = (x_t - x0)/sigma. Raises ValueError where sigma_t = 0
        for those (x_t then holds no noise to read eps from).
        """
        _check_same_shape(x0_hat, x_t, "x0_hat")
        alpha, sigma = self._broadcast(self.coefficients(timesteps), x0_hat, x_t)
        x0_c, x_t_c = x0_hat.to(alpha.dtype), x_t.to(alpha.dtype)
        if self.prediction_type == "sample":
            return x0_c
        if bool((sigma <= 0).any()):
            raise ValueError(f"sigma_t = 0 at some timesteps: x_t is x0 there and a {self.prediction_type!r} "
                             "prediction is undetermined; draw t with sigma > 0 (TimestepSampling)")
        if self.prediction_type == "epsilon":
            return (x_t_c - alpha * x0_c) / sigma
        if self.prediction_type == "v_prediction":
            return (alpha * x_t_c - x0_c) / sigma
        if self.prediction_type == "velocity":
            return (x_t_c - x0_c) / sigma
        assert_never(self.prediction_type)

    def _broadcast(self, coefficients: tuple[Tensor, Tensor], *like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, sigma) shaped (N, 1, ..., 1) on the data's device, float32 (float64 if a tensor is)."""
        ref = like[0]
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in like) else torch.float32
        alpha, sigma = coefficients
        if alpha.shape[0] != ref.shape[0]:
            raise ValueError(f"got {alpha.shape[0]} timesteps for a batch of {ref.shape[0]}; pass one t per element")
        shape = (ref.shape[0],) + (1,) * (ref.ndim - 1)
        return alpha.to(ref.device, dtype).reshape(shape), sigma.to(ref.device, dtype).reshape(shape)


def forward_noise(
    process: ForwardProcess,
    x0: Float[Tensor, "N ..."],
    generator: torch.Generator,
    sampling: TimestepSampling | None = None,
) -> NoisedBatch:
    """Draw t (``sampling``) and eps ~ N(0, I) from ``generator`` and noise the (detached) x0.

    To train several t per sample, repeat the samples first (``x0.repeat_interleave(k, 0)``, and the
    advantages likewise): each row gets its own t and eps.
    """
    x0 = x0.detach()
    if generator.device != x0.device:
        raise ValueError(f"generator is on {generator.device} but x0 on {x0.device}; pass a generator on x0's device")
    timesteps = process.sample_timesteps(x0.shape[0], generator, sampling)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return NoisedBatch(x0=x0, noise=noise, timesteps=timesteps, x_t=process.add_noise(x0, noise, timesteps))


def _check_same_shape(a: Tensor, x_t: Tensor, name: str) -> None:
    if a.shape != x_t.shape or a.ndim < 1:
        raise ValueError(f"{name} {tuple(a.shape)} and x_t {tuple(x_t.shape)} must share one (N, ...) shape")


RegressionSpace = Literal["x0", "prediction"]


def regression_residual(
    process: ForwardProcess,
    prediction: Float[Tensor, "N ..."],
    batch: NoisedBatch,
    space: RegressionSpace,
) -> Float[Tensor, "N ..."]:
    """What a forward-process objective squares: the prediction's error at ``batch`` in ``space``.

    prediction: f(x_t, t) in the model's parametrisation, minus its pretraining target
      (:meth:`ForwardProcess.training_target`; the pretraining loss of that parametrisation).
    x0: the implied clean-sample estimate minus x0 (DiffusionNFT regresses x0 this way for
      velocity models). It equals b_t times the prediction error (x0_hat is affine in f at fixed
      x_t, with slope b_t: 1 for "sample", -sigma/alpha for "epsilon", -sigma for "v_prediction" and
      "velocity"), i.e. the same regression with the per-t weight b_t^2.
    Float32 (float64 if an input is float64); differentiable in ``prediction``.
    """
    if space == "prediction":
        return prediction.to(torch.promote_types(prediction.dtype, torch.float32)) - process.training_target(
            batch.x0, batch.noise, batch.timesteps
        )
    if space == "x0":
        x0 = batch.x0.to(torch.promote_types(batch.x0.dtype, torch.float32))
        return process.prediction_to_x0(prediction, batch.x_t, batch.timesteps) - x0
    raise ValueError(f"regression_space={space!r} is not one of 'x0', 'prediction'")
