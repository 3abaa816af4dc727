import math
import threading
from dataclasses import replace

import pytest
import torch

from diffgrpo.advantages import AdvantageConfig, compute_advantages
from diffgrpo.rewards import (
    RewardSet,
    RewardSpec,
    available_rewards,
    get_reward,
    parse_reward_params,
    register_reward,
)


@register_reward("test_norm_parts")
def norm_parts(scale: float = 1.0):
    """Dict-valued test reward: per-sample L1 and L2 norms."""

    def reward(samples, batch):
        flat = samples.flatten(1)
        return {"l1": -scale * flat.abs().sum(1), "l2": -scale * flat.norm(dim=1)}

    return reward


@register_reward("test_bad_value")
def bad_value(kind: str = "nan"):
    def reward(samples, batch):
        out = torch.zeros(samples.shape[0])
        if kind == "nan":
            out[0] = math.nan
        elif kind == "shape":
            out = out[:-1]
        return out

    return reward


def make_batch(seed: int = 0, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(n, 4, 3, generator=gen)
    return samples, {"target": torch.zeros(4, 3)}


def test_registry_round_trip_and_unknown_names():
    assert {"neg_mse", "exp_neg_mse", "test_norm_parts"} <= set(available_rewards())
    samples, batch = make_batch()
    torch.testing.assert_close(get_reward("neg_mse")(samples, batch), -samples.pow(2).mean(dim=(1, 2)))
    squashed = get_reward("exp_neg_mse", omega=2.0)(samples, batch)
    torch.testing.assert_close(squashed, torch.exp(-2.0 * samples.pow(2).mean(dim=(1, 2))))
    with pytest.raises(KeyError, match="exp_neg_mse.*neg_mse"):
        get_reward("neg_mae")
    with pytest.raises(ValueError, match="omga"):
        get_reward("exp_neg_mse", omga=2.0)
    with pytest.raises(ValueError, match="already registered"):
        register_reward("neg_mse")(lambda: None)
    with pytest.raises(ValueError, match="'/'"):
        register_reward("a/b")


def test_reward_set_flattens_dict_rewards_and_weights_the_total():
    samples, batch = make_batch()
    rewards = RewardSet.from_specs([("neg_mse", 2.0), RewardSpec("test_norm_parts", 0.5, {"scale": 3.0})])
    out = rewards(samples, batch)
    assert list(out.components) == ["neg_mse", "test_norm_parts/l1", "test_norm_parts/l2"]
    assert out.weights == {"neg_mse": 2.0, "test_norm_parts/l1": 0.5, "test_norm_parts/l2": 0.5}
    flat = samples.flatten(1)
    torch.testing.assert_close(out.components["test_norm_parts/l1"], -3.0 * flat.abs().sum(1))
    expected_total = 2.0 * out.components["neg_mse"] + 0.5 * (
        out.components["test_norm_parts/l1"] + out.components["test_norm_parts/l2"]
    )
    torch.testing.assert_close(out.total, expected_total)
    # The weights feed the advantage computation directly.
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = compute_advantages(out.components, ids, replace(AdvantageConfig(), weights=out.weights))
    assert adv.advantages.shape == (6,)


def test_mapping_specs_and_task_supplied_callables():
    samples, batch = make_batch()
    from_mapping = RewardSet.from_specs({"neg_mse": 1.5})
    direct = RewardSet({"closeness": get_reward("neg_mse")}, weights={"closeness": 1.5})
    a, b = from_mapping(samples, batch), direct(samples, batch)
    torch.testing.assert_close(a.total, b.total)
    assert list(b.components) == ["closeness"]
    with pytest.raises(ValueError, match="weights have keys"):
        RewardSet({"closeness": get_reward("neg_mse")}, weights={"other": 1.0})


def test_invalid_reward_values_name_the_reward():
    samples, batch = make_batch()
    with pytest.raises(ValueError, match="'test_bad_value' returned NaN"):
        RewardSet.from_specs({"test_bad_value": 1.0})(samples, batch)
    with pytest.raises(ValueError, match="'test_bad_value' returned \\(5,\\)"):
        RewardSet.from_specs([("test_bad_value", 1.0, {"kind": "shape"})])(samples, batch)
    with pytest.raises(ValueError, match="'broken/x' returned"):
        RewardSet({"broken": lambda s, b: {"x": torch.zeros(2, 2)}})(samples, batch)
    with pytest.raises(ValueError, match="weight"):
        RewardSpec("neg_mse", math.inf)


def test_rewards_run_without_grad():
    samples, batch = make_batch()
    samples.requires_grad_(True)
    out = RewardSet.from_specs({"neg_mse": 1.0})(samples, batch)
    assert not out.total.requires_grad


def test_submit_matches_sync_and_runs_in_a_worker_thread():
    samples, batch = make_batch(seed=3)
    threads = []

    def recording(samples, batch):
        threads.append(threading.current_thread().name)
        return samples.flatten(1).sum(1)

    callables = {"mse": get_reward("neg_mse"), "sum": recording}
    with RewardSet(callables, weights={"mse": 1.0, "sum": 0.1}) as rewards:
        sync = rewards(samples, batch)
        futures = [rewards.submit(samples, batch) for _ in range(3)]
        results = [f.result(timeout=30) for f in futures]
    for result in results:
        assert result.components.keys() == sync.components.keys()
        for key in sync.components:
            assert torch.equal(result.components[key], sync.components[key])
        assert torch.equal(result.total, sync.total)
    assert threads[0] == threading.current_thread().name
    assert all(name.startswith("reward") for name in threads[1:])


def test_submit_propagates_errors_through_the_future():
    samples, batch = make_batch()
    with RewardSet.from_specs({"test_bad_value": 1.0}) as rewards:
        future = rewards.submit(samples, batch)
        with pytest.raises(ValueError, match="NaN"):
            future.result(timeout=30)


def test_reward_params_from_the_command_line_reach_the_factory():
    params = parse_reward_params(("exp_neg_mse.omega=2.5", "exp_neg_mse.target_key='goal'", "neg_mse.target_key=goal"))
    assert params == {"exp_neg_mse": {"omega": 2.5, "target_key": "goal"}, "neg_mse": {"target_key": "goal"}}
    rewards = RewardSet.from_specs([RewardSpec("exp_neg_mse", 1.0, params["exp_neg_mse"])])
    samples, goal = torch.zeros(2, 3), torch.ones(2, 3)
    out = rewards(samples, {"goal": goal})
    torch.testing.assert_close(out.total, torch.full((2,), math.exp(-2.5)))  # exp(-omega * mean (x - y)^2), MSE 1


def test_reward_params_name_the_mistake():
    with pytest.raises(ValueError, match="REWARD.KEY=VALUE"):
        parse_reward_params(("omega=2",))
    with pytest.raises(ValueError, match="takes no parameter sigma; it takes omega, target_key"):
        parse_reward_params(("exp_neg_mse.sigma=2",))
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        parse_reward_params(("no_such_reward.omega=2",))
    with pytest.raises(ValueError, match="twice"):
        parse_reward_params(("exp_neg_mse.omega=2", "exp_neg_mse.omega=3"))
