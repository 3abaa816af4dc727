"""The prediction-gap guard with the LoRA reference (the adapter-disabled policy) and the EMA old policy."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_process import ForwardProcess, forward_noise
from diffgrpo.guard import prediction_gap
from diffgrpo.lora import AdapterDisabledReference, LoRAConfig, add_lora
from diffgrpo.nft import NFTConfig, OldPolicySchedule, nft_loss, update_old_policy

FLOW = ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))


class TinyDenoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(3, 3)

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        return self.to_q(x_t)


def test_nft_with_the_lora_reference_and_the_ema_old_policy():
    torch.manual_seed(0)
    policy = add_lora(TinyDenoiser(), LoRAConfig(use_lora=True, r=2, lora_alpha=2.0, target_modules=("to_q",)))
    reference = AdapterDisabledReference(policy)
    old = ParameterEMA(policy, decay=0.0)  # the adapters only
    assert set(old.shadow) == {n for n, p in policy.named_parameters() if p.requires_grad} and old.shadow
    gen = torch.Generator().manual_seed(1)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    schedule = OldPolicySchedule(rate=0.5, max_decay=0.5)
    deviations, gaps = [], []
    for it in range(3):
        batch = forward_noise(FLOW, torch.randn(8, 3, generator=gen), gen)
        with torch.no_grad(), old.swapped_in(policy):  # before the trained forward: the swap writes in place
            prediction_old = policy(batch.x_t)
        prediction = policy(batch.x_t)
        loss, stats = nft_loss(prediction, prediction_old, batch, advantages, FLOW, NFTConfig(kl_coef=0.1),
                               prediction_ref=reference(batch.x_t))
        deviations.append(float(stats.old_deviation))
        gaps.append(float(stats.kl))
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_old_policy(old, policy, it, schedule)
    # LoRA's B = 0 at start: policy == reference; iteration 0's old policy is the initial policy.
    assert gaps[0] == 0.0 and deviations[0] == 0.0
    assert deviations[1] == 0.0  # decay 0 at iteration 0: the old policy caught up with the update
    assert deviations[2] > 0.0  # decay 0.5 at iteration 1: it lags, and the statistic shows it
    assert gaps[1] > 0.0 and gaps[2] > 0.0  # the adapters moved the policy away from the reference


def test_the_guard_gradient_pulls_the_policy_back_to_the_reference():
    torch.manual_seed(0)
    policy = add_lora(TinyDenoiser(), LoRAConfig(use_lora=True, r=2, lora_alpha=2.0, target_modules=("to_q",)))
    reference = AdapterDisabledReference(policy)
    adapters = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in adapters:
            p.add_(0.3 * torch.randn_like(p))  # move the policy off the reference
    x = torch.randn(16, 3)
    opt = torch.optim.SGD(adapters, lr=0.1)
    before = float(prediction_gap(policy(x), reference(x)).mean().detach())
    for _ in range(5):
        gap = prediction_gap(policy(x), reference(x)).mean()
        opt.zero_grad()
        gap.backward()
        opt.step()
    after = float(prediction_gap(policy(x), reference(x)).mean().detach())
    assert before > 0.01 and after < 0.9 * before
