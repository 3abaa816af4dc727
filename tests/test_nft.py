"""DiffusionNFT: loss and gradient by hand, the old == current case, reward dependence, the old-policy EMA."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffgrpo.awm import AWMConfig, awm_loss
from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_process import ForwardProcess, NoisedBatch, forward_noise
from diffgrpo.nft import NFTConfig, OldPolicySchedule, nft_loss, optimality_probability, update_old_policy

FLOW = ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
PLAIN = dict(beta=0.5, max_abs_advantage=2.0, regression_space="prediction", use_adaptive_weight=False)


def _hand_batch() -> NoisedBatch:
    """x0 = (1, -1), eps = (0.5, 0.2), sigma = (0.5, 0.25): x_t = (0.75, -0.7), target eps - x0 = (-0.5, 1.2)."""
    x0, noise, t = torch.tensor([[1.0], [-1.0]]), torch.tensor([[0.5], [0.2]]), torch.tensor([500.0, 250.0])
    return NoisedBatch(x0=x0, noise=noise, timesteps=t, x_t=FLOW.add_noise(x0, noise, t))


def test_optimality_probability_mapping():
    r = optimality_probability(torch.tensor([-9.0, -1.0, 0.0, 2.5, 5.0]), 5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.4, 0.5, 0.75, 1.0]))


def test_loss_gradient_and_deviation_equal_a_hand_computation_on_a_linear_model():
    batch = _hand_batch()
    w, b = torch.tensor(2.0, requires_grad=True), torch.tensor(0.1, requires_grad=True)
    prediction = w * batch.x_t + b  # f_theta = (1.6, -1.3)
    old = torch.tensor([[1.0], [-1.0]])
    advantages = torch.tensor([1.0, -1.0])  # r = 1/2 + 1/2 * (+-1/2) = (0.75, 0.25)
    loss, stats = nft_loss(prediction, old, batch, advantages, FLOW, NFTConfig(**PLAIN))
    # f+ = 0.5 old + 0.5 f = (1.3, -1.15): residual (1.8, -2.35), squares (3.24, 5.5225)
    # f- = 1.5 old - 0.5 f = (0.7, -0.85): residual (1.2, -2.05), squares (1.44, 4.2025)
    # per sample (A_max / beta = 4): 4 (0.75 * 3.24 + 0.25 * 1.44) = 11.16, 4 (0.25 * 5.5225 + 0.75 * 4.2025) = 18.13
    torch.testing.assert_close(loss, torch.tensor((11.16 + 18.13) / 2))
    torch.testing.assert_close(stats.positive_loss, torch.tensor((3.24 + 5.5225) / 2))
    torch.testing.assert_close(stats.negative_loss, torch.tensor((1.44 + 4.2025) / 2))
    torch.testing.assert_close(stats.old_deviation, torch.tensor((0.36 + 0.09) / 2))  # (f - old)^2 = (0.36, 0.09)
    torch.testing.assert_close(stats.old_deviation_max, torch.tensor(0.36))
    torch.testing.assert_close(stats.optimality_mean, torch.tensor(0.5))
    loss.backward()
    # dL/df_i = (4 / 2) * 2 beta (r e+ - (1 - r) e-) = 2 (r e+ - (1 - r) e-) = (2 * 1.05, 2 * 0.95)
    torch.testing.assert_close(w.grad, torch.tensor(2.1 * 0.75 + 1.9 * -0.7))
    torch.testing.assert_close(b.grad, torch.tensor(2.1 + 1.9))


def test_adaptive_weight_and_kl_guard_by_hand():
    batch = _hand_batch()
    prediction, old = torch.tensor([[1.6], [-1.3]]), torch.tensor([[1.0], [-1.0]])
    cfg = NFTConfig(**{**PLAIN, "use_adaptive_weight": True, "kl_coef": 0.1})
    loss, stats = nft_loss(prediction, old, batch, torch.tensor([1.0, -1.0]), FLOW, cfg,
                           prediction_ref=torch.tensor([[1.0], [-1.3]]))
    # one dimension: e^2 / |e| = |e|: 4 (0.75 * 1.8 + 0.25 * 1.2) = 6.6, 4 (0.25 * 2.35 + 0.75 * 2.05) = 8.5
    torch.testing.assert_close(stats.policy_loss, torch.tensor((6.6 + 8.5) / 2))
    torch.testing.assert_close(stats.kl, torch.tensor(0.36 / 2))
    torch.testing.assert_close(loss, torch.tensor(7.55 + 0.1 * 0.18))


def _linear_grads(batch, advantages, cfg, *, old_equals_current: bool, objective: str = "nft"):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    prediction = model(batch.x_t)
    if objective == "awm":
        loss, stats = awm_loss(prediction, batch, advantages, FLOW, cfg)
    else:
        with torch.no_grad():
            old = model(batch.x_t) if old_equals_current else model(batch.x_t) + 0.3
        loss, stats = nft_loss(prediction, old, batch, advantages, FLOW, cfg)
    loss.backward()
    return loss.detach(), stats, torch.cat([p.grad.flatten() for p in model.parameters()])


def _batch_and_advantages():
    gen = torch.Generator().manual_seed(0)
    batch = forward_noise(FLOW, torch.randn(8, 3, generator=gen), gen)
    advantages = torch.tensor([1.5, -0.5, -1.0, 0.0, 0.8, -0.8, 2.0, -2.0])  # two groups of 4, zero mean each
    shuffled = advantages.reshape(2, 4)[:, [2, 0, 3, 1]].reshape(8)
    return batch, advantages, shuffled


@pytest.mark.parametrize("space", ["x0", "prediction"])
def test_old_equal_to_current_reports_zero_deviation_and_only_the_gradient_carries_the_rewards(space):
    batch, advantages, shuffled = _batch_and_advantages()
    cfg = NFTConfig(beta=1.0, max_abs_advantage=1.0, regression_space=space, use_adaptive_weight=False)
    loss, stats, grad = _linear_grads(batch, advantages, cfg, old_equals_current=True)
    loss_s, stats_s, grad_s = _linear_grads(batch, shuffled, cfg, old_equals_current=True)
    assert float(stats.old_deviation) == 0.0 and float(stats.old_deviation_max) == 0.0  # reported, exactly 0
    torch.testing.assert_close(loss, loss_s)  # f+ = f- = f: the value is (A_max / beta) mean l, reward-free
    assert (grad - grad_s).norm() > 0.1 * grad.norm()  # ... but the gradient is not
    # first order: NFT's gradient is advantage-weighted matching's with the advantage clipped at A_max
    awm_grad = _linear_grads(batch, advantages, AWMConfig(max_abs_advantage=1.0, regression_space=space),
                             old_equals_current=True, objective="awm")[2]
    torch.testing.assert_close(grad, awm_grad, atol=1e-5, rtol=1e-4)


def test_the_same_tensor_as_old_and_current_still_trains_on_the_rewards():
    """The silent fault of passing f_theta (with its graph) as f_old: here f_old is detached inside."""
    batch, advantages, shuffled = _batch_and_advantages()
    cfg = NFTConfig(regression_space="prediction", use_adaptive_weight=False)
    grads = []
    for adv in (advantages, shuffled):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 3)
        prediction = model(batch.x_t)
        nft_loss(prediction, prediction, batch, adv, FLOW, cfg)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).norm() > 0.1 * grads[0].norm()


def test_old_behind_current_rewards_change_value_and_gradient():
    batch, advantages, shuffled = _batch_and_advantages()
    cfg = NFTConfig()
    loss, stats, grad = _linear_grads(batch, advantages, cfg, old_equals_current=False)
    loss_s, _, grad_s = _linear_grads(batch, shuffled, cfg, old_equals_current=False)
    torch.testing.assert_close(stats.old_deviation, torch.tensor(0.09))  # 0.3^2 in every entry
    assert abs(float(loss - loss_s)) > 1e-3
    assert (grad - grad_s).norm() > 0.1 * grad.norm()


def test_old_policy_schedule_and_ema_update_by_hand():
    schedule = OldPolicySchedule(flat_steps=2, rate=0.1, max_decay=0.35)
    assert [schedule.decay(i) for i in range(7)] == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.35])
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    old = ParameterEMA(model, decay=0.0)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert update_old_policy(old, model, 4, schedule) == pytest.approx(0.2)
    torch.testing.assert_close(old.shadow["weight"], torch.tensor([[0.2 * 1.0 + 0.8 * 3.0]]))
    update_old_policy(old, model, 0, schedule)  # decay 0: the old policy becomes the current one
    torch.testing.assert_close(old.shadow["weight"], torch.tensor([[3.0]]))


def test_ddpm_epsilon_model_old_policy_from_the_ema_gives_exact_zero_deviation():
    process = ForwardProcess.from_scheduler(DDPMScheduler(num_train_timesteps=20, prediction_type="epsilon"))
    gen = torch.Generator().manual_seed(1)
    batch = forward_noise(process, torch.randn(6, 2, generator=gen), gen)
    model = torch.nn.Linear(2, 2)
    old = ParameterEMA(model, decay=0.0)
    with torch.no_grad(), old.swapped_in(model):
        prediction_old = model(batch.x_t)
    _, stats = nft_loss(model(batch.x_t), prediction_old, batch, torch.randn(6, generator=gen), process, NFTConfig())
    assert float(stats.old_deviation) == 0.0


@pytest.mark.unchecked_annotations
def test_bad_config_and_inputs_raise():
    with pytest.raises(ValueError, match="beta"):
        NFTConfig(beta=0.0)
    with pytest.raises(ValueError, match="max_decay"):
        OldPolicySchedule(max_decay=1.0)
    batch = _hand_batch()
    with pytest.raises(ValueError, match="prediction_old"):
        nft_loss(torch.zeros(2, 1), torch.zeros(2, 2), batch, torch.zeros(2), FLOW, NFTConfig())
    with pytest.raises(ValueError, match="needs prediction_ref"):
        nft_loss(torch.zeros(2, 1), torch.zeros(2, 1), batch, torch.zeros(2), FLOW, NFTConfig(kl_coef=1.0))
