"""Exploration subspaces: an orthonormal basis, an exact step density on it, and unchanged marginals."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffgrpo.chain import SamplingChain
from diffgrpo.config import SamplerConfig
from diffgrpo.exploration import ExplorationSubspace, dct_basis
from diffgrpo.rollout import group_ids_for, rollout
from diffgrpo.sde import reverse_step

SHAPE = (8, 5)  # (T, F)


def subspace(r: int | None = 3, features: tuple[int, int] | None = (1, 4)) -> ExplorationSubspace:
    return ExplorationSubspace.build(SHAPE, r, features)


def test_dct_basis_is_orthonormal_and_starts_constant():
    basis = dct_basis(16, 5).double()
    assert torch.allclose(basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(basis[:, 0], torch.full((16,), 0.25, dtype=torch.float64), atol=1e-7)  # 1/sqrt(16)
    # column k is cos(pi (t + 1/2) k / T) up to its norm
    t = torch.arange(16, dtype=torch.float64)
    cos2 = torch.cos(math.pi * (t + 0.5) * 2 / 16) * math.sqrt(2 / 16)
    assert torch.allclose(basis[:, 2], cos2, atol=1e-6)


@pytest.mark.parametrize("r, features", [(3, (1, 4)), (None, (0, 2)), (8, None), (1, (4, 5))])
def test_coordinates_embed_round_trip_and_projection(r, features):
    space = subspace(r, features)
    c = torch.randn(6, space.num_coordinates, dtype=torch.float64)
    assert torch.allclose(space.coordinates(space.embed(c)), c, atol=1e-6)
    v = torch.randn(6, *SHAPE, dtype=torch.float64)
    p = space.project(v)
    assert torch.allclose(space.project(p), p, atol=1e-6)  # idempotent
    assert abs(float(((v - p) * p).sum())) < 1e-5  # orthogonal residual
    if features is not None:  # nothing leaks outside the chosen features
        outside = torch.ones(SHAPE[-1], dtype=torch.bool)
        outside[features[0]:features[1]] = False
        assert float(p[..., outside].abs().max()) == 0.0


def test_bad_subspaces_name_the_limit():
    with pytest.raises(ValueError, match="num_components=9"):
        ExplorationSubspace.build(SHAPE, 9, None)
    with pytest.raises(ValueError, match="0 <= start < stop <= 5"):
        ExplorationSubspace.build(SHAPE, None, (2, 7))
    with pytest.raises(ValueError, match="noise_frequencies"):
        SamplerConfig(noise_frequencies=0)


def ddim(steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                              set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    return scheduler


def test_step_noise_lives_in_the_subspace_and_its_density_is_exact():
    scheduler, space = ddim(), subspace()
    x = torch.randn(4000, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = torch.randn(4000, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = int(scheduler.timesteps[3])
    step = reverse_step(scheduler, out, t, x, eta=1.0, generator=torch.Generator().manual_seed(2),
                             subspace=space)
    deterministic = reverse_step(scheduler, out, t, x, eta=0.0).prev_sample
    stochastic_mean = reverse_step(scheduler, out, t, x, eta=1.0, prev_sample=x).mean
    # outside the subspace the step is the eta = 0 rule exactly
    assert torch.allclose(step.prev_sample - space.project(step.prev_sample),
                          deterministic - space.project(deterministic), atol=1e-10)
    # inside it, coordinates are N(B^T mu_eta, std^2 I_r): Monte-Carlo mean and covariance
    std = float(step.std.flatten()[0])
    z = (space.coordinates(step.prev_sample) - space.coordinates(stochastic_mean)) / std  # (N, r)
    assert float(z.mean(0).abs().max()) < 0.07
    cov = z.T @ z / z.shape[0]
    assert torch.allclose(cov, torch.eye(space.num_coordinates, dtype=torch.float64), atol=0.09)
    # log-density: the r-dimensional Gaussian, by hand; "mean" divides by r, not by the sample size
    r = space.num_coordinates
    by_hand = -0.5 * z.square().sum(1) - r * (math.log(std) + 0.5 * math.log(2 * math.pi))
    assert torch.allclose(step.log_prob, by_hand, atol=1e-8)
    mean_reduced = reverse_step(scheduler, out, t, x, eta=1.0, prev_sample=step.prev_sample, subspace=space,
                                     log_prob_reduction="mean").log_prob
    assert torch.allclose(mean_reduced, by_hand / r, atol=1e-10)
    # re-scoring the stored sample reproduces the density exactly (on-policy ratio 1)
    again = reverse_step(scheduler, out, t, x, eta=1.0, prev_sample=step.prev_sample, subspace=space)
    assert torch.equal(again.log_prob, step.log_prob)


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_chain_with_a_subspace_samples_each_part_like_its_own_eta(family):
    """Data N(0, s^2 I) with its exact denoiser, so every coordinate of an orthonormal basis evolves on its
    own: the final samples' subspace coordinates are distributed as the stochastic chain's (eta 1, every
    dimension noised) and the complement as the deterministic chain's (eta 0). Both chains have their own
    discretisation bias at 20 steps (variance 0.19 and 0.21 against s^2 = 0.25 for DDIM), which is why
    the comparison is with the full chains and not with s^2."""
    s2, n = 0.25, 6000
    if family == "ddim":
        scheduler = ddim(20)
        timesteps = torch.cat([scheduler.timesteps, torch.tensor([-1])])
        abar = scheduler.alphas_cumprod.double()

        def model(x_t, t, cond):  # exact epsilon for Gaussian data
            a = abar[t.clamp_min(0).long()].reshape(-1, 1, 1)
            return (1 - a).sqrt() * x_t / (a * s2 + 1 - a)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(20)
        timesteps = torch.cat([scheduler.timesteps, torch.tensor([0.0])])

        def model(x_t, t, cond):  # exact velocity E[x1 - x0 | x_t] for Gaussian data
            sigma = (t / 1000).reshape(-1, 1, 1).double()
            var = (1 - sigma) ** 2 * s2 + sigma ** 2
            return (sigma - (1 - sigma) * s2) / var * x_t

    def final(sampler: SamplerConfig, seed: int):
        traj = rollout(model, SamplingChain.build(scheduler, timesteps, sampler, SHAPE), torch.zeros(n, 1),
                       group_ids_for(n, 1), generator=torch.Generator().manual_seed(seed))
        return traj.samples.double(), traj

    with_subspace, traj = final(SamplerConfig(eta=1.0, noise_frequencies=2, noise_features=(1, 4)), 3)
    stochastic, _ = final(SamplerConfig(eta=1.0), 4)
    deterministic, _ = final(SamplerConfig(eta=0.0), 5)
    space = ExplorationSubspace.build(SHAPE, 2, (1, 4))

    def inside_var(x):  # mean variance of the subspace coordinates
        return float(space.coordinates(x).var(0).mean())

    def outside_var(x):  # mean variance per complement dimension
        rest = x - space.project(x)
        return float(rest.square().sum((1, 2)).mean()) / (SHAPE[0] * SHAPE[1] - space.num_coordinates)

    assert abs(inside_var(with_subspace) - inside_var(stochastic)) < 0.01
    assert abs(outside_var(with_subspace) - outside_var(deterministic)) < 0.01
    if family == "ddim":  # the two chains differ by more than the tolerance, so the test can tell them apart
        assert abs(inside_var(stochastic) - outside_var(deterministic)) > 0.02
    assert bool(traj.is_stochastic[:-1].all())
