"""The sampling chain as one value: one step of it is the sde step at its (t_k, t_k+1), eta and subspace."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from diffgrpo.chain import SamplingChain, step_with_logprob
from diffgrpo.config import SamplerConfig
from diffgrpo.sde import reverse_step


def _chain(**sampler) -> SamplingChain:
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(6)
    timesteps = torch.cat([scheduler.timesteps, torch.tensor([-1])])
    return SamplingChain.build(scheduler, timesteps, SamplerConfig(**sampler), (8, 5))


def test_a_step_of_the_chain_is_the_sde_step_with_the_chains_settings():
    chain = _chain(eta=0.7, sde_window=(1, 4), noise_frequencies=2, noise_features=(1, 4))
    assert chain.num_steps == 6 and chain.subspace is not None
    x_t, out = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    for k in (0, 2):  # outside and inside the SDE window
        ours = step_with_logprob(chain, k, out, x_t, generator=torch.Generator().manual_seed(k))
        ref = reverse_step(chain.scheduler, out, chain.timesteps[k].expand(3), x_t, eta=0.7 if k else 0.0,
                           generator=torch.Generator().manual_seed(k), next_timestep=chain.timesteps[k + 1].expand(3),
                           log_prob_reduction="mean", subspace=chain.subspace)
        assert torch.equal(ours.prev_sample, ref.prev_sample) and torch.equal(ours.log_prob, ref.log_prob)
        rescored = step_with_logprob(chain, k, out, x_t, prev_sample=ours.prev_sample)
        assert torch.equal(rescored.log_prob, ours.log_prob)  # sampling and re-scoring: one code path


def test_the_chain_is_checked_when_built_and_reshaped_without_a_second_check():
    with pytest.raises(ValueError, match="sde_window=.*ends after the chain's K=6 steps"):
        _chain(sde_window=(2, 9))
    with pytest.raises(ValueError, match=r"num_components=9 must be in \[1, 8\]"):
        _chain(noise_frequencies=9)  # more DCT frequencies than the 8 frames
    chain = _chain(noise_frequencies=2)
    assert chain.with_sample_shape((8, 5)) is chain
    longer = chain.with_sample_shape((16, 5))
    assert longer.sample_shape == (16, 5) and longer.subspace.num_coordinates == 2 * 5
    assert longer.scheduler is chain.scheduler and torch.equal(longer.timesteps, chain.timesteps)


def _x0_eps_by_hand(prediction_type: str, out, x_t, abar):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps solved for the model's parameterisation (float64)."""
    a, b = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - b * out) / a, out
    if prediction_type == "sample":
        return out, (x_t - a * out) / b
    return a * x_t - b * out, a * out + b * x_t  # v = sqrt(abar) eps - sqrt(1 - abar) x0


def _step_by_hand(chain: SamplingChain, k: int, out, x_t):
    """(mean, std, x0) of step k from the methods' published formulas, in float64, element by element."""
    method, eta, sched = chain.sampler.method, chain.sampler.eta_at(k), chain.scheduler
    t, t_next = chain.timesteps[k].item(), chain.timesteps[k + 1].item()
    out, x_t = out.double(), x_t.double()
    if method in ("flow_sde", "cps"):
        sigma, sigma_next = t / 1000, t_next / 1000
        x0, x1 = x_t - sigma * out, x_t + (1 - sigma) * out
        if method == "cps":
            std = sigma_next * math.sin(eta * math.pi / 2)
            return (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, std, x0
        if sigma_next == 0:
            return x0, 0.0, x0
        dt = sigma_next - sigma
        s = eta * math.sqrt(sigma / (1 - (sigma_next if sigma >= 1 else sigma)))  # Flow-GRPO's SDE
        return x_t + dt * (out + s**2 / (2 * sigma) * x1), s * math.sqrt(-dt), x0
    abar, t, t_next = sched.alphas_cumprod.double(), int(t), int(t_next)
    a_t = abar[t]
    a_next = abar[t_next] if t_next >= 0 else torch.tensor(1.0, dtype=torch.float64)
    x0, eps = _x0_eps_by_hand(sched.config.prediction_type, out, x_t, a_t)
    if chain.scheduler.config.clip_sample:
        x0 = x0.clamp(-1, 1)
    variance = (1 - a_next) / (1 - a_t) * (1 - a_t / a_next)  # DDIM eq. (16) at eta = 1
    if method == "ddim":  # DDIM eq. (12)
        std = eta * variance.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next - std**2).sqrt() * eps, float(std), x0
    if method == "ddpm":  # DDPM eq. (7) for the step t -> t' (alpha = abar / abar')
        alpha = a_t / a_next
        mean = a_next.sqrt() * (1 - alpha) / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_next) / (1 - a_t) * x_t
        return mean, float(eta * variance.sqrt()), x0
    a_prev1 = abar[t - 1] if t >= 1 else torch.tensor(1.0, dtype=torch.float64)  # EgoAllo's single-step std
    s = 0.0 if a_next >= 1 else float(eta * ((1 - a_prev1) / (1 - a_t) * (1 - a_t / a_prev1)).sqrt())
    mean = a_next.sqrt() * x0 + math.sqrt(1 - a_next - s**2) * (x_t - a_t.sqrt() * x0) / (1 - a_t + 0.1).sqrt()
    return mean, s, x0


def _chain_of(method: str, prediction_type: str, **scheduler_kw) -> SamplingChain:
    if method in ("flow_sde", "cps"):
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(5)
        timesteps = torch.cat([scheduler.timesteps, torch.tensor([0.0])])
        eta = 0.7
    elif method == "ddim":
        scheduler = DDIMScheduler(prediction_type=prediction_type, steps_offset=1, **scheduler_kw)
        scheduler.set_timesteps(5)
        timesteps, eta = torch.cat([scheduler.timesteps, torch.tensor([-1])]), 0.8
    else:
        scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=False,
                                  beta_schedule="squaredcos_cap_v2" if method == "egoallo" else "linear")
        # EgoAllo's quadratic schedule 1000, 841, ..., 1, 0 in diffusers' indices (its k - 1)
        timesteps = torch.tensor([999] + [k * k - 1 for k in range(29, -1, -1)])
        eta = 0.8 if method == "egoallo" else 1.0
    return SamplingChain.build(scheduler, timesteps, SamplerConfig(method=method, eta=eta), (3, 4))


CASES = [(m, p) for m in ("ddim", "ddpm", "egoallo") for p in ("epsilon", "sample", "v_prediction")]
CASES += [("flow_sde", "flow_prediction"), ("cps", "flow_prediction")]


@pytest.mark.parametrize("method, prediction_type", CASES)
def test_the_precomputed_step_is_each_methods_formula_and_the_general_step(method: str, prediction_type: str):
    """The chain's step (coefficients computed once) equals the per-call step and the papers' formulas to
    float32 rounding, for every method and prediction type, on every step (the deterministic last one too)."""
    chain = _chain_of(method, prediction_type)
    for k in range(chain.num_steps):
        gen = torch.Generator().manual_seed(k)
        x_t, out = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
        ours = step_with_logprob(chain, k, out, x_t, generator=torch.Generator().manual_seed(9))
        mean, std, x0 = _step_by_hand(chain, k, out, x_t)
        scale = 1 + float(mean.abs().max())
        assert torch.allclose(ours.mean.double(), mean, rtol=1e-6, atol=2e-6 * scale), (k, method)
        assert torch.allclose(ours.x0_pred.double(), x0, rtol=1e-6, atol=2e-6 * (1 + float(x0.abs().max())))
        assert torch.allclose(ours.std.double().flatten(), torch.full((2,), std, dtype=torch.float64), rtol=1e-6)
        assert bool(ours.is_stochastic.all()) == (std > 0)
        reference = Normal(mean, max(std, 1e-30)).log_prob(ours.prev_sample.double()).reshape(2, -1)
        reference = reference.mean(1) if chain.sampler.log_prob_reduction == "mean" else reference.sum(1)
        if std > 0:
            assert torch.allclose(ours.log_prob.double(), reference, rtol=1e-5, atol=1e-3), (k, method)
        else:
            assert torch.equal(ours.log_prob, torch.zeros(2)) and torch.equal(ours.prev_sample, ours.mean)
        general = reverse_step(chain.scheduler, out, chain.timesteps[k].expand(2), x_t, eta=chain.sampler.eta_at(k),
                               generator=torch.Generator().manual_seed(9), method=method,
                               next_timestep=chain.timesteps[k + 1].expand(2),
                               log_prob_reduction=chain.sampler.log_prob_reduction)
        torch.testing.assert_close(ours.prev_sample, general.prev_sample)  # same noise draw, same Gaussian
        torch.testing.assert_close(ours.log_prob, general.log_prob, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours.next_timestep, general.next_timestep)
        rescored = step_with_logprob(chain, k, out, x_t, prev_sample=ours.prev_sample)
        assert torch.equal(rescored.log_prob, ours.log_prob)  # sampling and re-scoring: one code path


def test_the_precomputed_step_clips_x0_as_the_scheduler_does_and_sums_or_averages_as_asked():
    chain = _chain_of("ddim", "epsilon", clip_sample=True)
    assert chain.sampler.log_prob_reduction == "mean"
    sum_chain = SamplingChain.build(chain.scheduler, chain.timesteps,
                                    SamplerConfig(eta=0.8, log_prob_reduction="sum"), (3, 4))
    x_t, out = 3 * torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for k in range(chain.num_steps):
        ours = step_with_logprob(chain, k, out, x_t, generator=torch.Generator().manual_seed(k))
        mean, _, x0 = _step_by_hand(chain, k, out, x_t)
        assert float(x0.abs().max()) <= 1 and torch.allclose(ours.mean.double(), mean, atol=1e-5)
        general = reverse_step(chain.scheduler, out, chain.timesteps[k].expand(2), x_t, eta=0.8,
                               prev_sample=ours.prev_sample, next_timestep=chain.timesteps[k + 1].expand(2))
        torch.testing.assert_close(ours.mean, general.mean)
        summed = step_with_logprob(sum_chain, k, out, x_t, prev_sample=ours.prev_sample)
        torch.testing.assert_close(summed.log_prob / 12, ours.log_prob)


@pytest.mark.unchecked_annotations
def test_the_precomputed_step_names_non_finite_inputs_also_on_a_deterministic_step():
    chain = _chain_of("flow_sde", "flow_prediction")
    x_t, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    out[1, 0, 0] = float("nan")
    for k in (0, chain.num_steps - 1):  # a stochastic step and the deterministic last one
        with pytest.raises(ValueError, match=r"model_output has NaN/inf at batch elements \[1\]"):
            step_with_logprob(chain, k, out, x_t, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method, prediction_type", [("ddim", "v_prediction"), ("flow_sde", "flow_prediction")])
def test_the_precomputed_step_has_the_general_steps_gradient(method: str, prediction_type: str):
    """The update differentiates log pi through the chain's step: same gradient as the per-call step."""
    chain = _chain_of(method, prediction_type)
    x_t, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    prev = step_with_logprob(chain, 1, out, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    grads = []
    for fused in (True, False):
        leaf = out.clone().requires_grad_(True)
        if fused:
            step = step_with_logprob(chain, 1, leaf, x_t, prev_sample=prev)
        else:
            step = reverse_step(chain.scheduler, leaf, chain.timesteps[1].expand(2), x_t, eta=chain.sampler.eta_at(1),
                                prev_sample=prev, next_timestep=chain.timesteps[2].expand(2), method=method,
                                log_prob_reduction=chain.sampler.log_prob_reduction)
        (step.log_prob.sum() + step.x0_pred.sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
