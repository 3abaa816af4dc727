"""The probe set: deterministic evaluations, paired differences with a correct interval, named streams."""

import math

import pytest
import torch

from diffgrpo.config import GRPOConfig, PerturbConfig, ProbeConfig
from diffgrpo.probe import evaluate_probe, paired_difference, probe_indices, t_quantile_975
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import RandomStreams
from diffgrpo.train_step import collect, make_perturber
from tests.toy_task import ToyNet, ToyTask, toy_chain


def test_probe_evaluation_is_deterministic_and_sees_weight_changes():
    torch.manual_seed(0)
    task, model = ToyTask("ddim"), ToyNet()
    cfg = ProbeConfig(splits=("train", "test"), conditions_per_split=5, noises_per_condition=3, eval_every=1)
    rewards = RewardSet.from_specs({"toy_closeness": 1.0})
    first = evaluate_probe(task, model, toy_chain(task), cfg, rewards=rewards)
    again = evaluate_probe(task, model, toy_chain(task), cfg, rewards=rewards)
    assert set(first) >= {"reward/train/toy_closeness/all", "reward/train/total",
                          "reward/test/toy_closeness/first_half", "metric/test/mse"}
    for key, value in first.items():
        assert value.shape == (5, 3)
        assert torch.equal(value, again[key]), key  # common random numbers: bit-identical
    with torch.no_grad():
        model.net[-1].bias.add_(0.3)
    moved = evaluate_probe(task, model, toy_chain(task), cfg, rewards=rewards)
    assert not torch.equal(moved["reward/train/total"], first["reward/train/total"])


def test_probe_conditions_are_a_fixed_seeded_choice_per_split():
    a, b = probe_indices(100, 16, 7, "train"), probe_indices(100, 16, 7, "train")
    assert torch.equal(a, b) and len(set(a.tolist())) == 16 and bool((a.diff() > 0).all())
    assert not torch.equal(a, probe_indices(100, 16, 7, "test"))
    assert probe_indices(4, 16, 7, "train").tolist() == [0, 1, 2, 3]  # a small split gives all it has


def test_paired_difference_matches_a_hand_computed_t_interval():
    baseline = torch.zeros(4, 2)
    current = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 2.0], [0.0, 2.0]])  # per-condition means 2, 2, 3, 1
    diff = paired_difference(current, baseline)
    mean, sd = 2.0, math.sqrt((0 + 0 + 1 + 1) / 3)
    half = 3.1824 * sd / 2.0  # t_{0.975, 3} = 3.1824
    assert diff.mean == pytest.approx(mean)
    assert diff.ci_low == pytest.approx(mean - half, abs=5e-3) and diff.ci_high == pytest.approx(mean + half, abs=5e-3)
    assert diff.resolved and diff.num_conditions == 4
    assert not paired_difference(torch.tensor([[1.0], [-1.0]]), torch.zeros(2, 1)).resolved


@pytest.mark.parametrize(("dof", "exact"), [(1, 12.7062), (2, 4.3027), (3, 3.1824), (5, 2.5706), (15, 2.1314),
                                            (60, 2.0003), (1000, 1.9623)])
def test_t_quantile_matches_tables(dof, exact):
    assert t_quantile_975(dof) == pytest.approx(exact, abs=4e-3 if dof < 10 else 1e-4)


def test_named_streams_keep_initial_noise_independent_of_perturbation():
    """Turning perturbation on must not change x_T or the step noise (issue 9: common random numbers)."""
    torch.manual_seed(0)
    task, model = ToyTask("ddim"), ToyNet()
    batch = task.load_examples("train", torch.arange(3))
    rewards = RewardSet.from_specs({"toy_closeness": 1.0})
    runs = {}
    for name, scale in (("none", 0.0), ("perlin", 0.3)):
        cfg = GRPOConfig(rewards=("toy_closeness",), group_size=4, perturb=PerturbConfig(name, scale=scale))
        runs[name] = collect(task, model, toy_chain(task), batch, cfg=cfg, rewards=rewards,
                             perturber=make_perturber(cfg), generator=RandomStreams.from_seed(0),
                             group_id_offset=0)
    plain, perturbed = runs["none"].trajectory, runs["perlin"].trajectory
    assert torch.equal(plain.states[:, 0], perturbed.states[:, 0])  # same x_T
    assert not torch.equal(plain.cond, perturbed.cond)  # the perturbation did happen
    # One shared generator (the old behaviour) lets the perturbation's draws shift x_T.
    shared = {}
    for name, scale in (("none", 0.0), ("perlin", 0.3)):
        cfg = GRPOConfig(rewards=("toy_closeness",), group_size=4, perturb=PerturbConfig(name, scale=scale))
        shared[name] = collect(task, model, toy_chain(task), batch, cfg=cfg, rewards=rewards,
                               perturber=make_perturber(cfg), generator=torch.Generator().manual_seed(0),
                               group_id_offset=0).trajectory.states[:, 0]
    assert not torch.equal(shared["none"], shared["perlin"])


def test_streams_state_round_trip():
    streams = RandomStreams.from_seed(3, 1)
    state = streams.get_state()
    draws = [torch.randn(2, generator=getattr(streams, name)) for name in ("perturbation", "step_noise")]
    restored = RandomStreams.from_seed(99, 0)
    restored.set_state(state)
    assert all(torch.equal(d, torch.randn(2, generator=getattr(restored, n)))
               for d, n in zip(draws, ("perturbation", "step_noise"), strict=True))
    with pytest.raises(KeyError, match="initial_noise"):
        restored.set_state({k: v for k, v in state.items() if "initial_noise" not in k})


def test_sde_window_makes_steps_outside_it_deterministic():
    task, model = ToyTask("ddim"), ToyNet()
    num_steps = len(task.sampling_timesteps()) - 1
    cfg = GRPOConfig(rewards=("toy_closeness",), group_size=4)
    chain = toy_chain(task, eta=1.0, sde_window=(1, 3))
    data = collect(task, model, chain, task.load_examples("train", torch.arange(2)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=RandomStreams.from_seed(0), group_id_offset=0)
    expected = [1 <= k < 3 for k in range(num_steps)]
    assert data.trajectory.is_stochastic.tolist() == expected
    assert bool((data.trajectory.log_probs[:, [k for k in range(num_steps) if not expected[k]]] == 0).all())
    # Members of a group share x_T and the deterministic first step, so they agree until the window.
    states = data.trajectory.states
    assert torch.equal(states[0, 1], states[1, 1]) and not torch.equal(states[0, 2], states[1, 2])
