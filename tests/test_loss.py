import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal, kl_divergence

from diffgrpo.loss import LossConfig, gaussian_step_kl, grpo_loss, select_steps

LOG2 = math.log(2.0)


def hand_example():
    """Ratios [[2, 1], [0.5, 1]] and advantages [3, -1]."""
    log_prob_old = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]])
    log_prob = (log_prob_old + torch.tensor([[LOG2, 0.0], [-LOG2, 0.0]])).requires_grad_(True)
    return log_prob, log_prob_old, torch.tensor([3.0, -1.0])


@pytest.mark.parametrize(
    "clip_range, expected_objective, expected_clip_frac",
    [
        (None, (6 + 3) / 4 + (-0.5 - 1) / 4, 0.0),  # plain: per-sample means 4.5 and -0.75
        (0.2, (3.6 + 3) / 4 + (-0.8 - 1) / 4, 0.5),  # r=2 -> 1.2 * 3; r=0.5 -> min(-0.5, -0.8)
        ((0.1, 0.5), (4.5 + 3) / 4 + (-0.9 - 1) / 4, 0.5),  # bounds [0.9, 1.5]
    ],
)
def test_hand_computed_values(clip_range, expected_objective, expected_clip_frac):
    log_prob, log_prob_old, adv = hand_example()
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, cfg=LossConfig(clip_range=clip_range))
    assert loss.item() == pytest.approx(-expected_objective, abs=1e-6)
    assert stats.loss.item() == pytest.approx(-expected_objective, abs=1e-6)
    assert stats.clip_frac.item() == pytest.approx(expected_clip_frac)
    assert stats.ratio_mean.item() == pytest.approx((2 + 1 + 0.5 + 1) / 4, abs=1e-6)
    assert stats.ratio_max_dev.item() == pytest.approx(1.0, abs=1e-6)
    assert stats.approx_kl.item() == pytest.approx(((1 - LOG2) + (-0.5 + LOG2)) / 4, abs=1e-6)
    assert stats.num_terms.item() == 4


def test_on_policy_ratio_is_one_and_gradient_is_minus_advantage_over_n_k():
    gen = torch.Generator().manual_seed(0)
    n, k = 5, 7
    log_prob = torch.randn(n, k, generator=gen).requires_grad_(True)
    adv = torch.randn(n, generator=gen)
    for clip_range in (None, 0.1, (0.05, 0.3)):
        cfg = LossConfig(clip_range=clip_range)
        loss, stats = grpo_loss(log_prob, log_prob.detach().clone(), adv, cfg=cfg)
        assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
        assert stats.ratio_max_dev.item() == 0.0 and stats.clip_frac.item() == 0.0
        assert stats.approx_kl.item() == 0.0
        (grad,) = torch.autograd.grad(loss, log_prob)
        torch.testing.assert_close(grad, -adv[:, None].expand(n, k) / (n * k))


def test_clipped_terms_carry_no_gradient():
    log_prob_old = torch.zeros(4, 1)
    # ratios 2 (A>0: clipped), 0.5 (A<0: clipped), 2 (A<0: pessimistic branch keeps r*A), 1.1 (inside)
    log_prob = torch.log(torch.tensor([[2.0], [0.5], [2.0], [1.1]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, cfg=LossConfig(clip_range=0.2))
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0
    assert grad[2].item() == pytest.approx(1.0 * 2.0 / 4)  # -A * r / N with A = -1
    assert grad[3].item() == pytest.approx(-1.0 * 1.1 / 4)
    assert stats.clip_frac.item() == 0.5


@settings(max_examples=100, deadline=None)
@given(
    st.floats(-3.0, 3.0),
    st.floats(-5.0, 5.0),
    st.floats(0.01, 0.9),
    st.floats(0.01, 2.0),
)
def test_clip_bounds_hold(log_ratio, advantage, eps_low, eps_high):
    log_prob = torch.tensor([[log_ratio]])
    adv = torch.tensor([advantage])
    cfg = LossConfig(clip_range=(eps_low, eps_high))
    loss, _ = grpo_loss(log_prob, torch.zeros(1, 1), adv, cfg=cfg)
    objective = -loss.item()
    ratio = math.exp(log_ratio)
    clipped_ratio = min(max(ratio, 1 - eps_low), 1 + eps_high)
    tol = 1e-5 * (1 + abs(advantage) * ratio)
    assert objective <= ratio * advantage + tol and objective <= clipped_ratio * advantage + tol
    assert objective == pytest.approx(min(ratio * advantage, clipped_ratio * advantage), abs=tol)
    if advantage > 0:
        assert objective <= (1 + eps_high) * advantage + tol  # no credit for pushing the ratio past the bound
    else:
        assert objective <= (1 - eps_low) * advantage + tol


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gaussian_step_kl_matches_torch_normal_kl(reduction):
    gen = torch.Generator().manual_seed(1)
    n, k, d = 3, 4, 5
    mean = torch.randn(n, k, d, 2, generator=gen)
    mean_ref = mean + 0.3 * torch.randn(n, k, d, 2, generator=gen)
    std = torch.rand(n, k, 1, 1, generator=gen) * 0.5 + 0.05
    expected = kl_divergence(Normal(mean, std.expand_as(mean)), Normal(mean_ref, std.expand_as(mean)))
    expected = expected.flatten(2).sum(-1) if reduction == "sum" else expected.flatten(2).mean(-1)
    torch.testing.assert_close(gaussian_step_kl(mean, mean_ref, std, reduction=reduction), expected)
    torch.testing.assert_close(gaussian_step_kl(mean, mean, 0.1), torch.zeros(n, k))
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_step_kl(mean, mean_ref, torch.zeros(n, k, 1, 1))


@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_huge_log_ratios_are_bounded_to_a_finite_loss_and_gradient(clip_range):
    # Summed log-probs over ~14,000 dims drift by 1000 nats after a few inner epochs: exp overflows.
    log_prob_old = torch.tensor([[-5e4, -5e4], [-5e4, -5e4]])
    log_prob = (log_prob_old + torch.tensor([[1000.0, -1000.0], [1000.0, 0.0]])).requires_grad_(True)
    adv = torch.tensor([-1.0, 2.0])
    cfg = LossConfig(clip_range=clip_range)
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, cfg=cfg)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[0].abs().max() == 0 and grad[1, 0] == 0  # a bounded term carries no gradient
    assert stats.bounded_frac.item() == pytest.approx(3 / 4)
    assert all(math.isfinite(v) for v in stats.to_dict().values())
    all_bounded, stats = grpo_loss(log_prob_old + 1000.0, log_prob_old, adv, cfg=cfg)
    assert torch.isfinite(all_bounded) and stats.bounded_frac.item() == 1.0
    with pytest.raises(ValueError, match="NaN or inf"):  # an infinite log-prob is a bug, not a large ratio
        grpo_loss(torch.full((2, 2), math.inf), log_prob_old, adv, cfg=cfg)


def test_bound_leaves_on_policy_and_moderate_ratios_untouched():
    log_prob_old = torch.full((2, 3), -5e4)
    shifts = torch.tensor([[0.0, 5.0, -5.0], [19.9, -19.9, 0.0]])  # within the default 20 nats
    adv = torch.tensor([1.0, -1.0])
    log_prob = log_prob_old + shifts
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, cfg=LossConfig())
    ratio = torch.exp(log_prob - log_prob_old)  # the shifts as float32 rounds them at 5e4
    expected = -(ratio[0].mean() * adv[0] + ratio[1].mean() * adv[1]) / 2
    torch.testing.assert_close(loss, expected)
    assert stats.bounded_frac.item() == 0.0
    with pytest.raises(ValueError, match="max_log_ratio"):
        LossConfig(max_log_ratio=0.0)


def test_kl_term_enters_the_loss_with_its_coefficient():
    log_prob, log_prob_old, adv = hand_example()
    kl = torch.tensor([[0.2, 0.4], [1.0, 0.0]])
    plain, _ = grpo_loss(log_prob, log_prob_old, adv, cfg=LossConfig())
    with_kl, stats = grpo_loss(log_prob, log_prob_old, adv, kl=kl, cfg=LossConfig(kl_coef=0.5))
    assert stats.kl.item() == pytest.approx(0.4)  # mean of per-sample means 0.3 and 0.5
    assert with_kl.item() == pytest.approx(plain.item() + 0.5 * 0.4)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(log_prob, log_prob_old, adv, cfg=LossConfig(kl_coef=0.5))


def test_masks_exclude_samples_and_steps():
    gen = torch.Generator().manual_seed(2)
    log_prob_old = torch.randn(6, 5, generator=gen)
    log_prob = log_prob_old + 0.1 * torch.randn(6, 5, generator=gen)
    adv = torch.randn(6, generator=gen)
    cfg = LossConfig(clip_range=0.05)
    keep = torch.tensor([True, False, True, True, False, True])
    steps = torch.tensor([True, True, False, True, False])
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, mask=keep, step_mask=steps, cfg=cfg)
    sub = (keep.nonzero().flatten()[:, None], steps.nonzero().flatten()[None, :])
    expected, _ = grpo_loss(log_prob[sub], log_prob_old[sub], adv[keep], cfg=cfg)
    torch.testing.assert_close(loss, expected)
    assert stats.num_terms.item() == 4 * 3
    # Per-sample step masks: each sample averages over its own steps.
    per_sample = torch.zeros(6, 5, dtype=torch.bool)
    per_sample[0, :2] = True
    per_sample[1, 4] = True
    loss, _ = grpo_loss(log_prob, log_prob_old, adv, step_mask=per_sample, cfg=LossConfig())
    ratio = torch.exp(log_prob - log_prob_old)
    expected = -(ratio[0, :2].mean() * adv[0] + ratio[1, 4] * adv[1]) / 2
    torch.testing.assert_close(loss, expected)


def test_nothing_selected_gives_zero_loss_that_still_backpropagates():
    log_prob, log_prob_old, adv = hand_example()
    nobody = torch.zeros(2, dtype=torch.bool)
    loss, stats = grpo_loss(log_prob, log_prob_old, adv, mask=nobody, cfg=LossConfig())
    loss.backward()
    assert loss.item() == 0.0 and stats.num_terms.item() == 0
    assert torch.equal(log_prob.grad, torch.zeros(2, 2))


@pytest.mark.unchecked_annotations
def test_input_and_config_validation():
    log_prob, log_prob_old, adv = hand_example()
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(log_prob, log_prob_old, adv[:1], cfg=LossConfig())
    with pytest.raises(ValueError, match="step_mask"):
        grpo_loss(log_prob, log_prob_old, adv, step_mask=torch.ones(3, dtype=torch.bool), cfg=LossConfig())
    with pytest.raises(ValueError, match="NaN"):
        grpo_loss(log_prob, log_prob_old, torch.tensor([math.nan, 1.0]), cfg=LossConfig())
    for bad in (0.0, 1.5, (0.2, -0.1), -0.3):
        with pytest.raises(ValueError, match="clip_range"):
            LossConfig(clip_range=bad)
    with pytest.raises(ValueError, match="kl_coef"):
        LossConfig(kl_coef=-1.0)


def test_select_steps_modes_exclude_deterministic_steps():
    stochastic = torch.tensor([True] * 9 + [False])  # the final step is deterministic
    assert select_steps(10, "all", is_stochastic=stochastic).tolist() == stochastic.tolist()
    window = select_steps(10, "window", window=(6, 10), is_stochastic=stochastic)
    assert window.nonzero().flatten().tolist() == [6, 7, 8]
    picks = [
        select_steps(10, "random_fraction", fraction=0.5, generator=gen, is_stochastic=stochastic)
        for gen in (torch.Generator().manual_seed(s) for s in (0, 0, 1))
    ]
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    for pick in picks:
        assert pick.sum().item() == round(0.5 * 9) and not pick[9]
    assert select_steps(4, "random_fraction", fraction=0.01, generator=torch.Generator()).sum().item() == 1
    with pytest.raises(ValueError, match="no stochastic step"):
        select_steps(10, "window", window=(9, 10), is_stochastic=stochastic)
    with pytest.raises(ValueError, match="Generator"):
        select_steps(10, "random_fraction", fraction=0.5)
    with pytest.raises(ValueError, match="window"):
        select_steps(10, "window", window=(5, 11))


@pytest.mark.unchecked_annotations  # the shape error below is the library's own ValueError, not jaxtyping's
def test_advantage_weighted_x0_loss_matches_hand_computation_and_points_at_the_better_samples():
    from diffgrpo.loss import advantage_weighted_x0_loss

    x0_final = torch.tensor([[1.0, 3.0], [-1.0, 1.0], [0.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0, 0.5])
    pred = torch.zeros(3, 2, requires_grad=True)  # a state shared by the group: one prediction for all
    loss = advantage_weighted_x0_loss(pred, x0_final, advantages, mask=torch.tensor([True, True, False]))
    # kept rows 0, 1: (1 * (1 + 9) / 2 / 2 - 1 * (1 + 1) / 2 / 2) / 2
    assert float(loss) == pytest.approx((1.0 * 10 / 4 - 1.0 * 2 / 4) / 2)
    loss.backward()
    # d/dpred_i = A_i (pred_i - x0_i) / (2 dims x 2 kept): descent moves row 0 towards its sample, row 1 away
    assert torch.allclose(pred.grad, torch.tensor([[-0.25, -0.75], [-0.25, 0.25], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="must share the leading N"):
        advantage_weighted_x0_loss(pred, x0_final[:2], advantages)
    with pytest.raises(ValueError, match="no ratio to clip"):
        LossConfig(objective="x0_regression", clip_range=0.2)
