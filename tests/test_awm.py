"""Advantage-weighted matching: loss and gradient by hand, reward dependence, the guard, the clip."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffgrpo.advantages import AdvantageConfig, compute_advantages
from diffgrpo.awm import AWMConfig, awm_loss
from diffgrpo.forward_process import ForwardProcess, NoisedBatch, forward_noise

FLOW = ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))


def _hand_batch() -> NoisedBatch:
    """x0 = (1, -1), eps = (0.5, 0.2), sigma = (0.5, 0.25): x_t = (1 - sigma) x0 + sigma eps = (0.75, -0.7)."""
    x0, noise, t = torch.tensor([[1.0], [-1.0]]), torch.tensor([[0.5], [0.2]]), torch.tensor([500.0, 250.0])
    return NoisedBatch(x0=x0, noise=noise, timesteps=t, x_t=FLOW.add_noise(x0, noise, t))


def test_loss_and_gradient_equal_a_hand_computation_on_a_linear_model():
    batch = _hand_batch()
    torch.testing.assert_close(batch.x_t, torch.tensor([[0.75], [-0.7]]))
    w, b = torch.tensor(2.0, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    prediction = w * batch.x_t + b  # (1.6, -1.3); target eps - x0 = (-0.5, 1.2); residual (2.1, -2.5)
    loss, stats = awm_loss(prediction, batch, torch.tensor([1.0, -1.0]), FLOW, AWMConfig())
    # (1 * 2.1^2 - 1 * 2.5^2) / 2 = (4.41 - 6.25) / 2
    torch.testing.assert_close(loss, torch.tensor(-0.92))
    torch.testing.assert_close(stats.matching_error, torch.tensor((4.41 + 6.25) / 2))
    loss.backward()
    # d/dw = mean_i A_i 2 res_i x_t_i = (2 * 2.1 * 0.75 + (-1) * 2 * (-2.5) * (-0.7)) / 2 = (3.15 - 3.5) / 2
    torch.testing.assert_close(w.grad, torch.tensor(-0.175))
    # d/db = (2 * 2.1 + 5.0) / 2
    torch.testing.assert_close(b.grad, torch.tensor(4.6))


def test_kl_guard_clip_and_mask_by_hand():
    batch = _hand_batch()
    prediction = torch.tensor([[1.6], [-1.3]], requires_grad=True)
    reference = torch.tensor([[1.0], [-1.3]])
    cfg = AWMConfig(max_abs_advantage=2.0, kl_coef=0.5)
    loss, stats = awm_loss(prediction, batch, torch.tensor([7.0, 0.0]), FLOW, cfg, prediction_ref=reference)
    # policy: (2 * 4.41 + 0) / 2 = 4.41 (the advantage 7 clipped to 2); kl: (0.36 + 0) / 2 = 0.18
    torch.testing.assert_close(stats.policy_loss, torch.tensor(4.41))
    torch.testing.assert_close(stats.kl, torch.tensor(0.18))
    torch.testing.assert_close(loss, torch.tensor(4.41 + 0.5 * 0.18))
    assert float(stats.clip_frac) == 0.5
    masked, masked_stats = awm_loss(prediction, batch, torch.tensor([7.0, -3.0]), FLOW, cfg,
                                    prediction_ref=reference, mask=torch.tensor([True, False]))
    torch.testing.assert_close(masked, torch.tensor(2 * 4.41 + 0.5 * 0.36))  # only the first sample counts
    assert float(masked_stats.num_samples) == 1.0


def test_x0_space_is_the_prediction_space_weighted_by_sigma_squared_for_velocity():
    batch = _hand_batch()
    prediction = torch.tensor([[1.6], [-1.3]])
    adv = torch.tensor([1.0, 1.0])
    x0_loss = awm_loss(prediction, batch, adv, FLOW, AWMConfig(regression_space="x0"))[0]
    # x0_hat - x0 = -sigma (u - target): residuals (-1.05, 0.625); mean of squares
    torch.testing.assert_close(x0_loss, torch.tensor((0.25 * 4.41 + 0.0625 * 6.25) / 2))


def _model_and_grad(batch: NoisedBatch, advantages: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    loss, _ = awm_loss(model(batch.x_t), batch, advantages, FLOW, AWMConfig(), mask=mask)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_rewards_shuffled_within_groups_change_the_gradient():
    gen = torch.Generator().manual_seed(0)
    group_ids = torch.arange(4).repeat_interleave(4)  # 4 groups of 4
    rewards = torch.randn(16, generator=gen)
    batch = forward_noise(FLOW, torch.randn(16, 3, generator=gen), gen)
    result = compute_advantages({"r": rewards}, group_ids, AdvantageConfig())
    shuffled = rewards.reshape(4, 4)[:, [1, 2, 3, 0]].reshape(16)  # a cyclic shift inside every group
    result_shuffled = compute_advantages({"r": shuffled}, group_ids, AdvantageConfig())
    grad, grad_shuffled = _model_and_grad(batch, result.advantages), _model_and_grad(batch, result_shuffled.advantages)
    assert (grad - grad_shuffled).norm() > 0.1 * grad.norm()
    # and the group-mean baseline: a reward shift shared by a group leaves the gradient as it is
    shifted = compute_advantages({"r": rewards + 3.0 * group_ids}, group_ids, AdvantageConfig())
    torch.testing.assert_close(_model_and_grad(batch, shifted.advantages), grad)


@pytest.mark.unchecked_annotations
def test_bad_inputs_raise():
    batch = _hand_batch()
    with pytest.raises(ValueError, match="kl_coef"):
        AWMConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match="needs prediction_ref"):
        awm_loss(torch.zeros(2, 1), batch, torch.zeros(2), FLOW, AWMConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="one per noised"):
        awm_loss(torch.zeros(2, 1), batch, torch.zeros(3), FLOW, AWMConfig())
