"""Bad configurations and inputs fail early with a message that names the problem and the fix."""

import pytest
import torch
from accelerate import Accelerator

import tasks.ego_motion.grpo as ego_job
from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig, PerturbConfig, SamplerConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.rollout import group_ids_for, rollout
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask, toy_chain


def test_unknown_reward_lists_the_known_ones(tmp_path):
    cfg = GRPOConfig(rewards=("toy_closness",), num_iterations=1)
    with pytest.raises(KeyError, match=r"toy_closness.*toy_closeness"):
        train_grpo(ToyTask(), ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"rewards": ()}, "no rewards configured"),
])
def test_invalid_config_values(kwargs, message):
    base = {"rewards": ("toy_closeness",)}
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{**base, **kwargs})


def test_negative_eta():
    with pytest.raises(ValueError, match="eta must be >= 0"):
        SamplerConfig(eta=-1.0)


def test_negative_perturbation_scale():
    with pytest.raises(ValueError, match="perturb.scale"):
        PerturbConfig(name="perlin", scale=-0.1)


def test_nan_condition_names_the_rows():
    task, cfg = ToyTask(), GRPOConfig(rewards=("toy_closeness",), group_size=2)
    batch = task.load_examples("train", torch.arange(3))
    batch["condition"][1] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[1\] holds NaN"):
        collect(task, ToyNet(), toy_chain(task), batch, cfg=cfg,
                rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                generator=make_generator(0), group_id_offset=0)


def test_wrong_condition_rows_for_rollout():
    task = ToyTask()
    cond = torch.zeros(5, 1)
    with pytest.raises(ValueError, match="expand the conditions"):
        rollout(lambda x, t, c: x, toy_chain(task), cond, group_ids_for(2, 2),
                generator=make_generator(0))


def test_bad_reward_weight_spec():
    from diffgrpo.trainer import parse_reward_specs

    with pytest.raises(ValueError, match="must be a number"):
        parse_reward_specs(("toy_closeness:heavy",))


# Issue 11, item 6: everything that can be checked at start-up is checked at start-up.


def test_sampler_method_and_perturber_are_closed_sets():
    # __post_init__ raises ValueError; under the suite's runtime type checking the Literal annotation
    # already rejects the value (a TypeError naming it) before __post_init__ runs.
    with pytest.raises((ValueError, TypeError), match="dddim"):
        SamplerConfig(method="dddim")
    with pytest.raises((ValueError, TypeError), match="perlinn"):
        PerturbConfig(name="perlinn", scale=0.1)
    with pytest.raises(ValueError, match="no effect with perturb.name='none'"):
        PerturbConfig(name="none", scale=0.1)


def test_step_window_is_checked_on_construction_and_against_the_chain(tmp_path):
    from diffgrpo.config import StepSelectionConfig
    from diffgrpo.trainer import check_run

    with pytest.raises(ValueError, match="needs --grpo.steps.window START END"):
        StepSelectionConfig(mode="window")  # the old default window was rejected only at the first update
    with pytest.raises(ValueError, match="only used with --grpo.steps.mode window"):
        StepSelectionConfig(mode="all", window=(0, 3))
    task = ToyTask()
    chain = toy_chain(task)
    num_steps = chain.num_steps
    cfg = GRPOConfig(rewards=("toy_closeness",), steps=StepSelectionConfig(mode="window", window=(0, num_steps + 1)))
    with pytest.raises(ValueError, match=rf"ends after the chain's K={num_steps} steps"):
        check_run(task, cfg, chain)
    with pytest.raises(ValueError, match="ends after the chain"):  # and train_grpo checks before any work
        train_grpo(task, ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path)


def test_sampler_that_cannot_step_the_chain_fails_when_the_chain_is_built():
    with pytest.raises(ValueError, match="'flow_sde' does not apply to DDIMScheduler"):
        SamplingChain.of(ToyTask("ddim"), SamplerConfig(method="flow_sde"))


def test_egoallo_eta_out_of_range_fails_when_the_task_config_is_built():
    from tasks.ego_motion.task import EgoMotionTaskConfig

    EgoMotionTaskConfig(sampler_eta=0.95)
    with pytest.raises(ValueError, match=r"--task.sampler-eta 0.99.*valid range 0 <= eta <= 0.97"):
        EgoMotionTaskConfig(sampler_eta=0.99)


def test_optimizer_values_are_checked():
    from diffgrpo.config import OptimConfig

    for kwargs, message in (({"learning_rate": 0.0}, "learning_rate must be > 0"),
                            ({"betas": (0.9, 1.0)}, r"betas must be two values in \[0, 1\)"),
                            ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0")):
        with pytest.raises(ValueError, match=message):
            OptimConfig(**kwargs)


# Issue 11, item 5: settings whose ratios can overflow are rejected up front.


def test_summed_log_probs_with_several_epochs_and_no_clip_are_rejected():
    from diffgrpo.loss import LossConfig
    from diffgrpo.trainer import check_run

    task = ToyTask()
    summed = SamplingChain.of(task, SamplerConfig(log_prob_reduction="sum"))
    with pytest.raises(ValueError, match=r"exp\(\) overflows.*--grpo.loss.clip-range"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), inner_epochs=2), summed)
    check_run(task, GRPOConfig(rewards=("toy_closeness",), inner_epochs=2, loss=LossConfig(clip_range=0.2)), summed)
    check_run(task, GRPOConfig(rewards=("toy_closeness",), inner_epochs=1), summed)


# Issue 11, item 4: no recipe flag is parsed and then ignored.


def test_ego_job_has_one_home_for_its_sampler_and_records_the_chain_it_samples():
    recipe = ego_job
    assert not hasattr(recipe.default_grpo(), "sampler")  # no --grpo.sampler.* flag to set and then ignore
    with pytest.raises(ValueError, match="--perceptual-omega only apply with the perceptual reward"):
        recipe.Config(use_perceptual_reward=False, perceptual_omega=2.0)
    cfg = recipe.Config(task=recipe.EgoMotionTaskConfig(sampler_eta=0.7))
    recorded = cfg.effective()["grpo"]["sampler"]
    assert recorded["method"] == "egoallo" and recorded["eta"] == 0.7  # what the run uses, not SamplerConfig()
    chain = cfg.rollout_chain()
    assert chain.num_steps == cfg.rollout_sampling_steps and chain.sampler.eta == 0.7
    assert cfg.rollout_chain() is chain  # built and checked once


def test_eta_range_is_checked_on_the_sde_window_steps_only():
    from diffgrpo.chain import check_sampler
    from tasks.ego_motion.model.motion import sampling_timesteps
    from tasks.ego_motion.model.prior import make_scheduler

    chain = sampling_timesteps(10, convention="diffusers")
    with pytest.raises(ValueError, match="valid range"):
        check_sampler(make_scheduler(), chain, SamplerConfig(method="egoallo", eta=1.0))  # step 0 cannot take eta 1
    check_sampler(make_scheduler(), chain, SamplerConfig(method="egoallo", eta=1.0, sde_window=(3, 8)))


def test_probe_and_train_splits_are_checked_at_start_up():
    from diffgrpo.config import ProbeConfig
    from diffgrpo.trainer import check_run

    task = ToyTask()
    chain = toy_chain(task)
    with pytest.raises(ValueError, match="no split 'post_train'"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), train_split="post_train"), chain)
    probe = ProbeConfig(splits=("train", "validation"), eval_every=5)
    with pytest.raises(ValueError, match="no split 'validation'"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), probe=probe), chain)
    with pytest.raises(ValueError, match="conditions-per-iteration >= 2"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), conditions_per_iteration=1, diagnostics_every=1),
                  chain)
    with pytest.raises(ValueError, match="probe.eval_every = 0"):
        ProbeConfig(conditions_per_split=8)
