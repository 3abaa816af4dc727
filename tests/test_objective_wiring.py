"""Every objective through ``policy_update`` and ``train_grpo`` on the toy task: learning, reward dependence,
the KL guard, DiffusionNFT's old policy, deterministic sampling, config errors and bit-exact resume."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.cli import flags_spelled
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, StepSelectionConfig
from diffgrpo.diagnostics import flat_grad, forward_gradient_agreement
from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_update import forward_terms_loss, plain_model_fn, prepare_forward_terms
from diffgrpo.loss import LossConfig
from diffgrpo.nft import NFTConfig, OldPolicySchedule
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer, reference_policy
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask, toy_chain

OBJECTIVES = ("ratio", "x0_regression", "nft", "awm")


def _cfg(objective: str, **kw) -> GRPOConfig:
    base = dict(num_iterations=4, conditions_per_iteration=4, group_size=4, micro_batch_size=8,
                rewards=("toy_closeness",), optim=OptimConfig(learning_rate=1e-3), checkpoint_every=2,
                loss=LossConfig(objective=objective))
    base.update(kw)
    return GRPOConfig(**base)


def _rollout(task, model, chain, cfg):
    return collect(task, model, chain, task.load_examples("train", torch.arange(4)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0, "rollout", 0), group_id_offset=0)


def _update(task, model, chain, data, cfg, *, optimizer=None, old_policy="fresh", reference=None):
    """One policy_update; returns (stats, parameter change)."""
    if old_policy == "fresh":
        old_policy = ParameterEMA(model, 0.0) if cfg.loss.objective == "nft" else None
    optimizer = optimizer or make_optimizer(model, cfg)[0]
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    stats = policy_update(task, model, chain, data, optimizer, cfg=cfg, generator=make_generator(0, "select"),
                          accelerator=Accelerator(cpu=True), old_policy=old_policy, reference=reference)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return stats, after - before


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "flow"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_updates_the_policy(objective, kind):
    torch.manual_seed(0)
    task, model = ToyTask(kind), ToyNet()
    cfg = _cfg(objective)
    chain = toy_chain(task)
    stats, delta = _update(task, model, chain, _rollout(task, model, chain, cfg), cfg)
    assert stats["loss/optimizer_steps"] == 1.0
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert float(delta.abs().max()) > 1e-6  # the parameters moved
    if objective in ("ratio", "x0_regression"):  # the step objectives' first update stays exactly on-policy
        assert stats["loss/on_policy_ratio_max_dev"] < 1e-5
    else:
        assert "loss/on_policy_ratio_max_dev" not in stats


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_update_depends_on_the_rewards(objective):
    """The silent fault of NFT implementations: a loss that stops depending on the rewards. Shuffling the
    advantages within each group must change the update; the same advantages must reproduce it exactly."""
    torch.manual_seed(0)
    task, model = ToyTask("flow"), ToyNet()
    cfg = _cfg(objective, optim=OptimConfig(learning_rate=1e-3, max_grad_norm=0.0))
    chain = toy_chain(task)
    data = _rollout(task, model, chain, cfg)
    adv = data.advantages.advantages.reshape(4, 4)
    assert bool((adv.std(1) > 0).all())  # every group has a spread, so a shuffle changes each one
    shuffled = dataclasses.replace(data, advantages=dataclasses.replace(
        data.advantages, advantages=adv.roll(1, dims=1).reshape(-1)))
    deltas = []
    for variant in (data, data, shuffled):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.SGD(trained.parameters(), lr=1.0)  # the step is minus the gradient
        deltas.append(_update(task, trained, chain, variant, cfg, optimizer=optimizer)[1])
    assert torch.equal(deltas[0], deltas[1])
    assert float((deltas[0] - deltas[2]).norm()) > 0.1 * float(deltas[0].norm())


def test_nft_reports_its_old_policy_deviation():
    """Exactly 0 while the old policy equals the trained one (first optimiser step), > 0 once it lags."""
    torch.manual_seed(0)
    task, model = ToyTask("flow"), ToyNet()
    cfg = _cfg("nft", num_minibatches=2, micro_batch_size=4)
    chain = toy_chain(task, eta=0.0)  # a deterministic sampler is enough for NFT
    data = _rollout(task, model, chain, cfg)
    old = ParameterEMA(model, 0.0)
    first, _ = _update(task, copy.deepcopy(model), chain, data, dataclasses.replace(cfg, num_minibatches=1),
                       old_policy=old)
    assert first["loss/old_deviation"] == 0.0 and first["loss/old_deviation_max"] == 0.0
    second, _ = _update(task, model, chain, data, cfg, old_policy=old)
    assert second["loss/old_deviation_max"] > 0.0


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_kl_guard_pulls_towards_the_reference(objective):
    """The guard is 0 while the policy is the reference, > 0 once the first optimiser step has moved it."""
    torch.manual_seed(0)
    task, model = ToyTask("ddim"), ToyNet()
    cfg = _cfg(objective, num_minibatches=2, micro_batch_size=4,
               loss=LossConfig(objective=objective, kl_coef=0.5,
                               clip_range=0.2 if objective == "ratio" else None))
    chain = toy_chain(task)
    data = _rollout(task, model, chain, cfg)
    stats, _ = _update(task, model, chain, data, cfg, reference=reference_policy(model))
    assert stats["loss/kl"] > 0.0
    first, _ = _update(task, copy.deepcopy(model), chain, data, dataclasses.replace(cfg, num_minibatches=1),
                       reference=reference_policy(model))
    assert first["loss/kl"] < 1e-10


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_forward_objectives_train_with_a_deterministic_sampler(objective, tmp_path):
    """With eta = 0 the members of a group share their whole chain (one initial noise), so they differ only
    through the perturbed condition; without weight decay the weights move only through the rewards."""
    torch.manual_seed(0)
    task = ToyTask("flow")
    cfg = _cfg(objective, num_iterations=2, checkpoint_every=0, perturb=PerturbConfig("gaussian", scale=0.3),
               optim=OptimConfig(learning_rate=1e-3, weight_decay=0.0))
    history = train_grpo(task, ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path,
                         chain=toy_chain(task, eta=0.0))
    assert all(v > 0 for v in history["policy/relative_step"])
    if objective == "nft":
        assert len(history["loss/old_deviation"]) == 2 and history["old_policy/decay"] == [0.0, 0.001]


def test_step_objectives_refuse_a_deterministic_sampler(tmp_path):
    task = ToyTask("flow")
    for objective in ("ratio", "x0_regression"):
        with pytest.raises(ValueError, match="sampler.eta = 0.*--grpo.loss.objective nft"):
            train_grpo(task, ToyNet(), _cfg(objective), accelerator=Accelerator(cpu=True), output_dir=tmp_path,
                       chain=toy_chain(task, eta=0.0))


def test_objective_config_errors_name_the_flag_as_the_recipe_spells_it():
    with pytest.raises(ValueError, match="--base.grpo.loss.nft settings.*--base.grpo.loss.objective nft"):
        with flags_spelled({"--grpo.": "--base.grpo."}):
            LossConfig(objective="awm", nft=NFTConfig(beta=0.1))
    with pytest.raises(ValueError, match="--grpo.loss.old-policy"):
        LossConfig(objective="ratio", old_policy=OldPolicySchedule(rate=0.01))
    with pytest.raises(ValueError, match="no ratio to clip.*--grpo.loss.clip-range"):
        LossConfig(objective="nft", clip_range=0.2)
    with pytest.raises(ValueError, match="--grpo.loss.kl-coef"):
        LossConfig(objective="nft", nft=NFTConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="--grpo.steps"):
        _cfg("awm", steps=StepSelectionConfig(mode="random_fraction", fraction=0.5))
    assert LossConfig(objective="x0_regression", kl_coef=0.1).kl_coef == 0.1  # the guard lifts the old refusal


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["nft", "x0_regression", "awm"])
def test_resume_is_bit_identical_with_old_policy_and_reference(objective, tmp_path):
    loss = LossConfig(objective=objective, kl_coef=0.1,
                      **({"old_policy": OldPolicySchedule(rate=0.2)} if objective == "nft" else {}))
    cfg = _cfg(objective, num_iterations=4, checkpoint_every=2, num_minibatches=2, micro_batch_size=4, loss=loss)
    task = ToyTask("flow")
    torch.manual_seed(0)
    straight = ToyNet()
    init = _params(straight)
    hist_a = train_grpo(task, straight, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "a")
    resumed = ToyNet()
    resumed.load_state_dict(init)
    train_grpo(task, resumed, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b", stop_after=2)
    fresh = ToyNet()  # a new process with other weights: the checkpoint restores policy, old policy and reference
    hist_b = train_grpo(task, fresh, cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path / "b", resume=True)
    for key, value in _params(straight).items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    for key in ("reward/toy_closeness/all", "loss/kl", "policy/relative_step"):
        assert hist_a[key] == hist_b[key], key
    assert min(hist_a["loss/kl"][1:]) > 0
    if objective == "nft":
        assert hist_a["loss/old_deviation"] == hist_b["loss/old_deviation"]
        assert hist_a["old_policy/decay"] == [0.0, 0.2, 0.4, 0.5]


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_forward_objectives_gradient_agreement_is_the_updates_own_gradient(objective):
    """The halves' mean gradient is the whole batch's update gradient (the loss averages over rows, halves of
    equal size), for the same forward noisings; with several micro-batches per half the result is unchanged."""
    torch.manual_seed(0)
    task, model = ToyTask("flow"), ToyNet()
    cfg = _cfg(objective, loss=LossConfig(objective=objective, kl_coef=0.1))
    chain = toy_chain(task)
    data = _rollout(task, model, chain, cfg)
    old = ParameterEMA(model, 0.0) if objective == "nft" else None
    reference = reference_policy(model)
    logs = forward_gradient_agreement(task, model, chain, data, cfg=cfg, generator=make_generator(0, "d"),
                                      old_policy=old, reference=reference)
    n = data.trajectory.samples.shape[0]
    terms = prepare_forward_terms(task, model, chain, data.trajectory.samples, data.trajectory.cond, [slice(0, n)],
                                  cfg=cfg, generator=make_generator(0, "d"), reference=reference, old_policy=old)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = forward_terms_loss(plain_model_fn(task, model), terms, data.trajectory.cond,
                                 data.advantages.advantages, data.advantages.mask, 0, slice(0, n), cfg=cfg)
    assert logs["grad/norm"] == pytest.approx(float(flat_grad(loss, params).norm()), rel=1e-5)
    assert -1 <= logs["grad/cos_halves"] <= 1
    chunked = forward_gradient_agreement(task, model, chain, data, cfg=dataclasses.replace(cfg, micro_batch_size=3),
                                         generator=make_generator(0, "d"), old_policy=old, reference=reference)
    assert chunked == pytest.approx(logs, rel=1e-5)
    with pytest.raises(ValueError, match="use gradient_agreement"):
        forward_gradient_agreement(task, model, chain, data, cfg=_cfg("ratio"), generator=make_generator(0, "d"))
    # rows dropped from the loss (zero_std_policy 'drop'): micro-batches weigh by their kept rows, as the update does
    mask = data.advantages.mask.clone()
    mask[[0, 1, 2, 9]] = False
    dropped = dataclasses.replace(data, advantages=dataclasses.replace(data.advantages, mask=mask))
    whole, split = (forward_gradient_agreement(task, model, chain, dropped, old_policy=old, reference=reference,
                                               cfg=dataclasses.replace(cfg, micro_batch_size=m),
                                               generator=make_generator(0, "d")) for m in (16, 3))
    assert split == pytest.approx(whole, rel=1e-5) and whole != pytest.approx(logs, rel=1e-3)


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_forward_objectives_run_with_diagnostics_without_changing_the_run(objective, tmp_path):
    """--grpo.diagnostics-every with DiffusionNFT or AWM: the gradient agreement and the drift are logged, and
    the weights end where those of the same run without diagnostics do (the diagnostics draw no run noise)."""
    task = ToyTask("flow")
    cfg = _cfg(objective, num_iterations=3, checkpoint_every=0)
    ends = []
    for every in (0, 1):
        torch.manual_seed(0)
        model = ToyNet()
        history = train_grpo(task, model, dataclasses.replace(cfg, diagnostics_every=every),
                             accelerator=Accelerator(cpu=True), output_dir=tmp_path / str(every))
        ends.append(_params(model))
    assert len(history["grad/cos_halves"]) == 3 and all(-1 <= c <= 1 for c in history["grad/cos_halves"])
    drift = history["policy/drift_since_start"]
    assert 0 < drift[0] < drift[-1]
    for key, value in ends[0].items():
        assert torch.equal(value, ends[1][key]), key
