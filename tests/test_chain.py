"""The sampling chain as one value: one step of it is the sde step at its (t_k, t_k+1), eta and subspace."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

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
