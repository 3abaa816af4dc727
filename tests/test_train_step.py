"""Core GRPO loop on the toy task: on-policy ratio, learning, group noise, exact resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, SamplerConfig
from diffgrpo.loss import LossConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.rollout import group_ids_for, rollout, shared_initial_noise
from diffgrpo.run_state import make_optimizer
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask, toy_chain


def _cfg(**kw) -> GRPOConfig:
    base = dict(num_iterations=4, conditions_per_iteration=4, group_size=4, micro_batch_size=8,
                rewards=("toy_closeness",), optim=OptimConfig(learning_rate=1e-3), checkpoint_every=2)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.mark.parametrize(("kind", "reduction"), [("ddim", "sum"), ("ddim", "mean"), ("ddpm", "sum"),
                                                 ("flow", "sum"), ("flow", "mean")])
def test_first_update_is_exactly_on_policy(kind, reduction):
    torch.manual_seed(0)
    task, model = ToyTask(kind), ToyNet()
    cfg = _cfg(perturb=PerturbConfig("gaussian", scale=0.1))
    chain = SamplingChain.of(task, SamplerConfig(log_prob_reduction=reduction))
    accelerator = Accelerator(cpu=True)
    optimizer, schedule = make_optimizer(model, cfg)
    gen = make_generator(0, "rollout", 0)
    batch = task.load_examples("train", torch.arange(4))
    rewards = RewardSet.from_specs({"toy_closeness": 1.0})  # float: the suite checks annotations with beartype
    data = collect(task, model, chain, batch, cfg=cfg, rewards=rewards,
                   perturber=make_perturber(cfg), generator=gen, group_id_offset=0)
    # Several epochs of summed log-probs need a clip (GRPOConfig rejects them otherwise: ratios overflow).
    two_epochs = dataclasses.replace(cfg, inner_epochs=2, loss=LossConfig(clip_range=0.2))
    stats = policy_update(task, model, chain, data, optimizer, cfg=two_epochs,
                          generator=gen, accelerator=accelerator, lr_scheduler=schedule)
    assert stats["loss/on_policy_ratio_max_dev"] < 1e-5
    # The second inner epoch comes after an optimiser step: the policy has moved.
    assert stats["loss/ratio_max_dev"] > 1e-5


def test_group_noise_shared_within_and_distinct_across_groups():
    ids = group_ids_for(3, 4, offset=10)
    assert ids.tolist() == [10] * 4 + [11] * 4 + [12] * 4
    x_T = shared_initial_noise(ids, (5,), make_generator(0, "rollout", 0))
    for g in range(3):
        members = x_T[4 * g : 4 * g + 4]
        assert torch.equal(members, members[:1].expand_as(members))
    assert not torch.allclose(x_T[0], x_T[4]) and not torch.allclose(x_T[4], x_T[8])
    # Another process (stream index 1) draws different noise for its groups.
    other = shared_initial_noise(group_ids_for(3, 4, offset=13), (5,), make_generator(0, "rollout", 1))
    assert not torch.allclose(x_T, other)


def test_rollout_members_differ_only_after_the_first_step():
    task, model = ToyTask("ddim"), ToyNet()
    cond = task.encode_condition(task.load_examples("train", torch.arange(2)))
    cond = cond.repeat_interleave(3, 0)
    traj = rollout(lambda x, t, c: model(x, t, c), toy_chain(task), cond, group_ids_for(2, 3),
                   generator=make_generator(1, "r"))
    assert traj.states.shape == (6, task.num_steps + 1, 4)
    assert torch.equal(traj.states[0, 0], traj.states[2, 0])
    assert not torch.allclose(traj.states[0, 1], traj.states[1, 1])
    assert traj.log_probs.shape == (6, task.num_steps) and torch.isfinite(traj.log_probs).all()


def test_grpo_raises_the_toy_reward(tmp_path):
    torch.manual_seed(0)
    task, model = ToyTask("flow"), ToyNet()
    cfg = _cfg(num_iterations=60, conditions_per_iteration=8, group_size=8, micro_batch_size=64,
               optim=OptimConfig(learning_rate=3e-3), checkpoint_every=0)
    history = train_grpo(task, model, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path)
    first, last = history["reward/toy_closeness/all"][:10], history["reward/toy_closeness/all"][-10:]
    assert sum(last) / 10 > sum(first) / 10 + 0.05


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    cfg = _cfg(num_iterations=6, checkpoint_every=3, perturb=PerturbConfig("perlin", scale=0.2))
    torch.manual_seed(0)
    straight = ToyNet()
    init = _params(straight)
    hist_a = train_grpo(ToyTask("ddim"), straight, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "a")

    resumed = ToyNet()
    resumed.load_state_dict(init)
    train_grpo(ToyTask("ddim"), resumed, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
               stop_after=3)
    fresh = ToyNet()  # a new process: different init, restored from the checkpoint
    hist_b = train_grpo(ToyTask("ddim"), fresh, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
                        resume=True)
    for key, value in _params(straight).items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert hist_a["reward/toy_closeness/all"] == hist_b["reward/toy_closeness/all"]
    assert len(hist_b["reward/toy_closeness/all"]) == 6


def test_several_minibatches_keep_the_first_optimiser_step_on_policy():
    """Issue 9: several optimiser steps per rollout; only the first is exactly on-policy."""
    torch.manual_seed(0)
    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg(num_minibatches=3, micro_batch_size=4)
    optimizer, schedule = make_optimizer(model, cfg)
    data = collect(task, model, toy_chain(task), task.load_examples("train", torch.arange(4)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0, "rollout", 0), group_id_offset=0)
    stats = policy_update(task, model, toy_chain(task), data, optimizer, cfg=cfg,
                          generator=make_generator(0, "select"), accelerator=Accelerator(cpu=True),
                          lr_scheduler=schedule)
    assert stats["loss/optimizer_steps"] == 3.0
    assert stats["loss/on_policy_ratio_max_dev"] < 1e-5
    assert stats["loss/ratio_max_dev"] > 1e-5  # the later minibatches re-score under moved weights


def test_minibatches_cover_every_term_once_per_epoch():
    from diffgrpo.train_step import minibatch_terms

    terms = list(range(10))
    chunks = minibatch_terms(terms, 2, 3, torch.Generator().manual_seed(0))
    assert len(chunks) == 6 and [len(c) for c in chunks] == [3, 4, 3, 3, 4, 3]
    assert sorted(sum(chunks[:3], [])) == terms and sorted(sum(chunks[3:], [])) == terms
    assert minibatch_terms(terms, 1, 1, torch.Generator()) == [terms]  # one step: the order is kept
    with pytest.raises(ValueError, match="num_minibatches=11 exceeds the 10"):
        minibatch_terms(terms, 1, 11, torch.Generator())


def test_unit_score_weights_follow_the_step_stds():
    from diffgrpo.train_step import step_weights

    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg()
    data = collect(task, model, toy_chain(task), task.load_examples("train", torch.arange(2)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0), group_id_offset=0)
    steps = data.trajectory.is_stochastic.nonzero().flatten().tolist()
    weights = step_weights(data.trajectory, steps, "unit_score")
    stds = data.trajectory.step_stds
    assert sum(weights.values()) / len(steps) == pytest.approx(1.0)
    assert weights[steps[0]] / weights[steps[-1]] == pytest.approx(float(stds[steps[0]] / stds[steps[-1]]))
    assert step_weights(data.trajectory, steps, "uniform") == dict.fromkeys(steps, 1.0)


def test_probe_diagnostics_and_minibatches_resume_bit_identically(tmp_path):
    from diffgrpo.config import ProbeConfig

    cfg = _cfg(num_iterations=4, checkpoint_every=2, num_minibatches=2, diagnostics_every=2,
               probe=ProbeConfig(splits=("train", "test"), conditions_per_split=4, noises_per_condition=2,
                                 eval_every=2))
    torch.manual_seed(0)
    straight = ToyNet()
    init = _params(straight)
    hist_a = train_grpo(ToyTask("ddim"), straight, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "a")
    assert hist_a["probe/iteration"] == [0.0, 2.0, 4.0]
    assert hist_a["probe_diff/reward/train/total"][0] == 0.0  # the baseline against itself
    assert len(hist_a["grad/cos_halves"]) == 2 and all(-1 <= c <= 1 for c in hist_a["grad/cos_halves"])
    assert all(v > 0 for v in hist_a["policy/relative_step"]) and "policy/step_kl" in hist_a
    resumed = ToyNet()
    resumed.load_state_dict(init)
    train_grpo(ToyTask("ddim"), resumed, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
               stop_after=2)
    fresh = ToyNet()
    hist_b = train_grpo(ToyTask("ddim"), fresh, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
                        resume=True)
    for key, value in _params(straight).items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    for key in ("reward/toy_closeness/all", "probe_diff/reward/test/total", "probe_diff/reward/test/total/ci_low"):
        assert hist_a[key] == hist_b[key], key  # the probe baseline travelled in the checkpoint


def test_batch_to_and_bad_reward_name():
    with pytest.raises(KeyError, match="toy_closeness"):
        RewardSet.from_specs({"no_such_reward": 1.0})
    assert batch_to({"a": torch.zeros(2)}, "cpu")["a"].device.type == "cpu"


@pytest.mark.parametrize("sharing", ["member", "group", "nested"])
def test_perturbation_sharing(sharing):
    """Issue 9: per member, per group, or nested (P heads x M samples, normalised per same-head sub-group)."""
    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg(group_size=6, perturb=PerturbConfig("gaussian", scale=0.5, sharing=sharing,
                                                   heads_per_group=3 if sharing == "nested" else 2))
    data = collect(task, model, toy_chain(task), task.load_examples("train", torch.arange(2)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0), group_id_offset=0)
    cond = data.trajectory.cond.reshape(2, 6, -1)  # (B, G, D)
    heads = {"member": 6, "group": 1, "nested": 3}[sharing]
    distinct = [len({tuple(row.tolist()) for row in group}) for group in cond]
    assert distinct == [heads, heads]
    adv = data.advantages.advantages.reshape(2, heads if sharing == "nested" else 1, -1)
    # Advantages are centred within the groups that share one condition (sub-groups when nested).
    assert torch.allclose(adv.sum(-1), torch.zeros_like(adv.sum(-1)), atol=1e-5)
    if sharing == "nested":  # members 0-1, 2-3, 4-5 share a head
        assert torch.equal(cond[:, 0], cond[:, 1]) and not torch.equal(cond[:, 1], cond[:, 2])


def test_nested_sharing_needs_equal_subgroups():
    with pytest.raises(ValueError, match="sub-groups of equal size >= 2"):
        _cfg(group_size=8, perturb=PerturbConfig("perlin", scale=0.1, sharing="nested", heads_per_group=3))


def test_update_with_every_group_dropped_takes_no_step_and_does_not_crash():
    from diffgrpo.advantages import AdvantageConfig

    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg(num_minibatches=4, micro_batch_size=4, advantages=AdvantageConfig(zero_std_policy="drop"))
    data = collect(task, model, toy_chain(task), task.load_examples("train", torch.arange(4)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0), group_id_offset=0)
    dropped = dataclasses.replace(data, advantages=dataclasses.replace(
        data.advantages, mask=torch.zeros_like(data.advantages.mask)))
    optimizer, _ = make_optimizer(model, cfg)
    before = _params(model)
    stats = policy_update(task, model, toy_chain(task), dropped, optimizer, cfg=cfg,
                          generator=make_generator(1), accelerator=Accelerator(cpu=True))
    assert stats["loss/optimizer_steps"] == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_resume_under_another_configuration_is_refused(tmp_path):
    cfg = _cfg(num_iterations=2, checkpoint_every=1)
    train_grpo(ToyTask("ddim"), ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path, stop_after=1)
    with pytest.raises(ValueError, match="different configuration.*group_size"):
        train_grpo(ToyTask("ddim"), ToyNet(), dataclasses.replace(cfg, group_size=2),
                   accelerator=Accelerator(cpu=True), output_dir=tmp_path, resume=True)
    longer = dataclasses.replace(cfg, num_iterations=3)  # extending a run is allowed
    history = train_grpo(ToyTask("ddim"), ToyNet(), longer, accelerator=Accelerator(cpu=True), output_dir=tmp_path,
                         resume=True)
    assert len(history["reward/toy_closeness/all"]) == 3


@pytest.mark.unchecked_annotations
def test_rollout_chunks_must_divide_the_batch():
    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg(rollout_chunks=2)  # 4 conditions per iteration: chunks of 2
    with pytest.raises(ValueError, match=r"B=3 conditions.*--grpo\.rollout-chunks 2"):
        collect(task, model, toy_chain(task), task.load_examples("train", torch.arange(3)), cfg=cfg,
                rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                generator=make_generator(0), group_id_offset=0)


def test_learning_rate_schedules_follow_their_formulas_and_resume_bit_identically(tmp_path):
    """OptimConfig.lr_schedule: the rates of a 2-step warm-up then 4 decaying optimiser steps, by hand; a cosine
    run resumed halfway ends on the straight run's weights; a decaying run refuses to be extended."""
    rates = {}
    for shape in ("constant", "linear", "cosine"):
        cfg = _cfg(num_iterations=3, num_minibatches=2, optim=OptimConfig(learning_rate=1.0, warmup_steps=2,
                                                                          lr_schedule=shape))
        optimizer, schedule = make_optimizer(ToyNet(), cfg)
        rates[shape] = []
        for _ in range(6):
            rates[shape].append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
    warm = [1 / 3, 2 / 3]
    assert rates["constant"] == pytest.approx(warm + [1, 1, 1, 1])
    assert rates["linear"] == pytest.approx(warm + [1, 3 / 4, 1 / 2, 1 / 4])
    assert rates["cosine"] == pytest.approx(warm + [1, (1 + 2 ** -0.5) / 2, 1 / 2, (1 - 2 ** -0.5) / 2])

    cfg = _cfg(num_iterations=4, checkpoint_every=2, optim=OptimConfig(learning_rate=1e-3, lr_schedule="cosine"))
    torch.manual_seed(0)
    straight = ToyNet()
    init = _params(straight)
    train_grpo(ToyTask("ddim"), straight, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "a")
    resumed = ToyNet()
    resumed.load_state_dict(init)
    train_grpo(ToyTask("ddim"), resumed, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
               stop_after=2)
    fresh = ToyNet()
    history = train_grpo(ToyTask("ddim"), fresh, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b",
                         resume=True)
    for key, value in _params(straight).items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    # logged after each iteration's update: the rate of the next optimiser step, 0 after the last
    assert history["lr"] == pytest.approx([1e-3 * f for f in ((1 + 2 ** -0.5) / 2, 1 / 2, (1 - 2 ** -0.5) / 2, 0)])
    with pytest.raises(ValueError, match="decays .'cosine'. over the run's iterations.*--grpo.num-iterations 4"):
        train_grpo(ToyTask("ddim"), ToyNet(), dataclasses.replace(cfg, num_iterations=6),
                   accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b", resume=True)


@pytest.mark.unchecked_annotations
def test_bad_learning_rate_schedules_are_refused():
    with pytest.raises(ValueError, match="lr_schedule='step' is not one of"):
        OptimConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="warmup_steps=8 covers all 8 optimiser steps"):
        _cfg(num_iterations=4, num_minibatches=2, optim=OptimConfig(warmup_steps=8, lr_schedule="cosine"))
    assert _cfg(num_iterations=4, optim=OptimConfig(warmup_steps=8)).optim.warmup_steps == 8  # constant: allowed
