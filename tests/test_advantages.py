import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffgrpo.advantages import AdvantageConfig, compute_advantages, group_diversity


def group_means(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-group mean by an explicit loop (the test's independent reference)."""
    return torch.stack([values[group_ids == g].mean() for g in group_ids.unique()])


def random_batch(seed: int, sizes=(4, 1, 7, 3, 5)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unequal group sizes, shuffled non-contiguous ids, two sub-rewards of different scales."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((n,), 10 * g + 3) for g, n in enumerate(sizes)])
    ids = ids[torch.randperm(len(ids), generator=gen)]
    rewards = {
        "pos": torch.randn(len(ids), generator=gen) * 3.0 + 1.0,
        "vel": torch.rand(len(ids), generator=gen) * 0.1,
    }
    return rewards, ids


def test_matches_hand_computed_example():
    rewards = {"r": torch.tensor([1.0, 3.0, 10.0, 10.0, 4.0])}
    ids = torch.tensor([7, 7, 2, 2, 5])
    result = compute_advantages(rewards, ids, AdvantageConfig(eps=1e-4))
    # group 7: mean 2, population std 1 -> -1/(1+eps), +1/(1+eps); group 2 constant; group 5 single.
    expected = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0]) / (1.0 + 1e-4)
    expected[2:] = 0.0
    torch.testing.assert_close(result.advantages, expected)
    assert result.mask.all()
    assert result.diagnostics["zero_std_frac"] == pytest.approx(2 / 3)
    assert result.diagnostics["num_groups"] == 3
    assert result.diagnostics["group_std/r"] == pytest.approx(1 / 3)
    assert result.diagnostics["reward_mean/r"] == pytest.approx(28 / 5)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 8), min_size=1, max_size=6),
    st.integers(0, 10_000),
    st.sampled_from(["normalize_then_sum", "sum_then_normalize"]),
    st.sampled_from(["group", "batch", "none"]),
    st.sampled_from(["keep", "mask", "drop"]),
)
def test_zero_mean_per_group_and_never_nan(sizes, seed, combine, std_scope, policy):
    rewards, ids = random_batch(seed, tuple(sizes))
    cfg = AdvantageConfig(combine=combine, std_scope=std_scope, zero_std_policy=policy)
    result = compute_advantages(rewards, ids, cfg)
    assert torch.isfinite(result.advantages).all()
    means = group_means(result.advantages, ids)
    torch.testing.assert_close(means, torch.zeros(len(sizes)), atol=1e-5, rtol=0)
    assert all(math.isfinite(v) for v in result.diagnostics.values())


@pytest.mark.parametrize("combine", ["normalize_then_sum", "sum_then_normalize"])
@pytest.mark.parametrize("scale, shift", [(0.01, 5.0), (7.0, -3.0), (1e3, 1e2)])
def test_invariant_to_affine_rescaling_of_a_sub_reward(combine, scale, shift):
    rewards, ids = random_batch(0, sizes=(4, 6, 5))
    rewards = {k: v.double() for k, v in rewards.items()}  # float64: test the math, not rounding
    cfg = AdvantageConfig(combine=combine, eps=1e-12)
    base = compute_advantages(rewards, ids, cfg).advantages
    if combine == "normalize_then_sum":  # each sub-reward may be rescaled on its own
        changed = {**rewards, "vel": scale * rewards["vel"] + shift}
    else:  # only a common rescaling of the summed reward is invariant
        changed = {k: scale * v + shift for k, v in rewards.items()}
    torch.testing.assert_close(compute_advantages(changed, ids, cfg).advantages, base, atol=1e-6, rtol=1e-6)


def test_constant_and_single_member_groups_under_every_policy():
    rewards = {
        "a": torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 5.0]),
        "b": torch.tensor([3.0, 3.0, 3.0, 1.0, 1.0, 4.0]),
    }
    ids = torch.tensor([0, 0, 0, 1, 1, 2])  # group 0 constant, group 1 varies in "a", group 2 single
    policies = ("keep", "mask", "drop")
    results = {p: compute_advantages(rewards, ids, AdvantageConfig(zero_std_policy=p)) for p in policies}
    for result in results.values():
        assert torch.isfinite(result.advantages).all()
        assert result.diagnostics["zero_std_frac"] == pytest.approx(2 / 3)
        assert result.diagnostics["zero_std_frac/a"] == pytest.approx(2 / 3)
        assert result.diagnostics["zero_std_frac/b"] == pytest.approx(1.0)
        torch.testing.assert_close(result.advantages[[0, 1, 2, 5]], torch.zeros(4))
    assert results["keep"].mask.all() and results["mask"].mask.all()
    assert results["drop"].mask.tolist() == [False, False, False, True, True, False]
    assert results["drop"].diagnostics["kept_frac"] == pytest.approx(2 / 6)


def test_mask_zeroes_near_zero_std_terms_that_keep_leaves():
    # Group 0 of "b" varies by one float32 ulp of 1 (std 6e-8 relative, < threshold): keep returns a
    # non-zero term, mask exactly 0.
    rewards = {"a": torch.tensor([0.0, 1.0, 0.0, 1.0]), "b": torch.tensor([1.0, 1.0 + 2**-23, 0.0, 1.0])}
    ids = torch.tensor([0, 0, 1, 1])
    keep = compute_advantages(rewards, ids, AdvantageConfig(zero_std_policy="keep", eps=1e-9))
    mask = compute_advantages(rewards, ids, AdvantageConfig(zero_std_policy="mask", eps=1e-9))
    only_a = compute_advantages({"a": rewards["a"]}, ids, AdvantageConfig(eps=1e-9)).advantages
    assert (keep.advantages[:2] - only_a[:2]).abs().max() > 0.1
    torch.testing.assert_close(mask.advantages[:2], only_a[:2])
    assert mask.diagnostics["zero_std_frac/b"] == 0.5 and mask.diagnostics["zero_std_frac"] == 0.0


@pytest.mark.parametrize("policy", ["keep", "mask", "drop"])
@pytest.mark.parametrize("combine", ["normalize_then_sum", "sum_then_normalize"])
def test_equal_float32_rewards_are_collapsed_whatever_their_magnitude(policy, combine):
    # Six float32 rewards of exactly -208.66: float32 group statistics gave std 1.5e-5 and A = +0.13 each.
    rewards = {"r": torch.tensor([-208.66] * 6 + [-208.66, -100.0], dtype=torch.float32)}
    ids = torch.tensor([0] * 6 + [1, 1])
    cfg = AdvantageConfig(combine=combine, zero_std_policy=policy)
    result = compute_advantages(rewards, ids, cfg)
    assert result.advantages.dtype == torch.float32
    assert torch.equal(result.advantages[:6], torch.zeros(6))
    assert result.diagnostics["zero_std_frac"] == 0.5 and result.diagnostics["zero_std_frac/r"] == 0.5
    assert result.mask.tolist() == [policy != "drop"] * 6 + [True, True]


def test_collapse_threshold_is_relative_to_the_group_reward_scale():
    # Group 0: one float32 ulp apart at 1e6 (relative std 3e-8): collapsed although its std is 0.03.
    # Group 1: 1e-7 apart near 1e-7 (relative std 0.25): informative although its std is 5e-8.
    rewards = {"r": torch.tensor([1e6, 1e6 + 0.0625, 1e-7, 2e-7], dtype=torch.float32)}
    ids = torch.tensor([0, 0, 1, 1])
    result = compute_advantages(rewards, ids, AdvantageConfig(zero_std_policy="mask", eps=1e-12))
    assert torch.equal(result.advantages[:2], torch.zeros(2))
    torch.testing.assert_close(result.advantages[2:], torch.tensor([-1.0, 1.0]), atol=1e-4, rtol=0)  # eps = 2e-5 std
    assert result.diagnostics["zero_std_frac/r"] == 0.5
    exact_only = AdvantageConfig(zero_std_policy="mask", zero_std_threshold=0.0)  # exact ties still collapse
    tied = compute_advantages({"r": torch.tensor([3.0, 3.0, 1.0, 2.0])}, ids, exact_only)
    assert tied.diagnostics["zero_std_frac"] == 0.5 and tied.advantages.abs()[2:].min() > 0.9
    with pytest.raises(ValueError, match="zero_std_threshold=1.5.*relative"):
        AdvantageConfig(zero_std_threshold=1.5)


def test_batch_and_no_std_scope():
    rewards = {"r": torch.tensor([0.0, 2.0, 10.0, 14.0])}
    ids = torch.tensor([1, 1, 2, 2])
    batch = compute_advantages(rewards, ids, AdvantageConfig(std_scope="batch", eps=0.5))
    batch_std = rewards["r"].std(correction=0)
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (batch_std + 0.5))
    plain = compute_advantages(rewards, ids, AdvantageConfig(std_scope="none"))
    torch.testing.assert_close(plain.advantages, torch.tensor([-1.0, 1.0, -2.0, 2.0]))


def test_clip_bounds_advantages():
    rewards = {"r": torch.tensor([0.0, 0.0, 0.0, 9.0])}
    result = compute_advantages(rewards, torch.zeros(4, dtype=torch.long), AdvantageConfig(clip=1.0))
    # unclipped: (R - 2.25) / (3.897 + eps) = [-0.577, -0.577, -0.577, 1.732]
    expected = torch.tensor([-0.57735, -0.57735, -0.57735, 1.0])
    torch.testing.assert_close(result.advantages, expected, atol=1e-4, rtol=0)


def test_normalise_then_sum_differs_from_sum_then_normalise_as_expected():
    # A small-scale reward ("fine") that disagrees with a large-scale one ("coarse"): summing first
    # lets "coarse" dominate; normalising first gives both equal say, so they cancel.
    rewards = {"coarse": torch.tensor([0.0, 100.0]), "fine": torch.tensor([1.0, 0.0])}
    ids = torch.tensor([0, 0])
    per_reward = compute_advantages(rewards, ids, AdvantageConfig(eps=1e-8)).advantages
    sum_first = AdvantageConfig(combine="sum_then_normalize", eps=1e-8)
    summed = compute_advantages(rewards, ids, sum_first).advantages
    torch.testing.assert_close(per_reward, torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(summed, torch.tensor([-1.0, 1.0]))
    weights = {"coarse": 1.0, "fine": 3.0}
    weighted = compute_advantages(rewards, ids, AdvantageConfig(eps=1e-8, weights=weights))
    torch.testing.assert_close(weighted.advantages, torch.tensor([2.0, -2.0]))


@pytest.mark.unchecked_annotations
def test_input_validation_names_the_problem():
    ids = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="'b' has shape \\(2,\\)"):
        compute_advantages({"a": torch.zeros(3), "b": torch.zeros(2)}, ids, AdvantageConfig())
    with pytest.raises(ValueError, match="'b' contains NaN"):
        nan_reward = torch.tensor([0.0, math.nan, 1.0])
        compute_advantages({"a": torch.zeros(3), "b": nan_reward}, ids, AdvantageConfig())
    with pytest.raises(ValueError, match="integer"):
        compute_advantages({"a": torch.zeros(3)}, ids.float(), AdvantageConfig())
    with pytest.raises(ValueError, match="weights"):
        compute_advantages({"a": torch.zeros(3)}, ids, AdvantageConfig(weights={"x": 1.0}))
    with pytest.raises(ValueError, match="empty"):
        compute_advantages({}, ids, AdvantageConfig())
    for bad in [dict(eps=0.0), dict(clip=-1.0), dict(std_scope="global"), dict(zero_std_policy="skip")]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            AdvantageConfig(**bad)


def test_group_diversity_equals_brute_force_pairwise_distance():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(9, 4, 3, generator=gen)
    ids = torch.tensor([5, 1, 5, 1, 1, 9, 5, 5, 1])
    got = group_diversity(samples, ids)
    expected = []
    for g in (1, 5, 9):
        members = samples[ids == g].flatten(1)
        n = len(members)
        d2 = torch.cdist(members, members).pow(2)
        expected.append((d2.sum() / (n * (n - 1))).sqrt() if n > 1 else torch.tensor(0.0))
    torch.testing.assert_close(got, torch.stack(expected))
    assert group_diversity(torch.ones(4, 2), torch.tensor([0, 0, 1, 1])).eq(0).all()


def test_group_diversity_of_identical_float32_samples_is_exactly_zero():
    samples = torch.full((6, 3, 5), -208.66, dtype=torch.float32)  # float32 group means are off by an ulp
    samples[3:] += torch.arange(15, dtype=torch.float32).reshape(3, 5)
    got = group_diversity(samples, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0]
