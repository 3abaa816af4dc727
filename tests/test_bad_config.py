"""Bad configurations and inputs fail early with a message that names the problem and the fix."""

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.config import GRPOConfig, PerturbConfig, SamplerConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import group_ids_for, make_generator, rollout
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask


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
        collect(task, ToyNet(), task.make_scheduler(), batch, cfg=cfg,
                rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                generator=make_generator(0), group_id_offset=0)


def test_wrong_condition_rows_for_rollout():
    task = ToyTask()
    cond = torch.zeros(5, 1)
    with pytest.raises(ValueError, match="expand the conditions"):
        rollout(lambda x, t, c: x, task.make_scheduler(), cond, group_ids_for(2, 2), task.sampling_timesteps(),
                task.sample_shape, generator=make_generator(0), sampler=SamplerConfig())


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
    num_steps = len(task.sampling_timesteps()) - 1
    cfg = GRPOConfig(rewards=("toy_closeness",), steps=StepSelectionConfig(mode="window", window=(0, num_steps + 1)))
    with pytest.raises(ValueError, match=rf"ends after the chain's K={num_steps} steps"):
        check_run(task, cfg)
    with pytest.raises(ValueError, match="ends after the chain"):  # and train_grpo checks before any work
        train_grpo(task, ToyNet(), cfg, accelerator=Accelerator(cpu=True), output_dir=tmp_path)


def test_sampler_that_cannot_step_the_chain_fails_before_any_work(tmp_path):
    from diffgrpo.trainer import check_run

    cfg = GRPOConfig(rewards=("toy_closeness",), sampler=SamplerConfig(method="flow_sde"))
    with pytest.raises(ValueError, match="'flow_sde' does not apply to DDIMScheduler"):
        check_run(ToyTask("ddim"), cfg)


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

    summed = SamplerConfig(log_prob_reduction="sum")
    with pytest.raises(ValueError, match=r"exp\(\) overflows.*--grpo.loss.clip-range"):
        GRPOConfig(rewards=("toy_closeness",), inner_epochs=2, sampler=summed)
    GRPOConfig(rewards=("toy_closeness",), inner_epochs=2, sampler=summed, loss=LossConfig(clip_range=0.2))
    GRPOConfig(rewards=("toy_closeness",), inner_epochs=1, sampler=summed)


# Issue 11, item 4: no recipe flag is parsed and then ignored.


def test_ego_recipe_rejects_grpo_sampler_flags_and_records_the_effective_sampler():
    import dataclasses

    from tests.recipes import load_recipe

    recipe = load_recipe("ego_motion")
    grpo = dataclasses.replace(recipe.default_grpo(), sampler=SamplerConfig(eta=0.5))
    with pytest.raises(ValueError, match="--grpo.sampler.* was set.*--task.sampler-eta"):
        recipe.Config(grpo=grpo)
    with pytest.raises(ValueError, match="--omega-vis only apply with the perceptual reward"):
        recipe.Config(use_visual_reward=False, omega_vis=2.0)
    cfg = recipe.Config(task=recipe.EgoMotionTaskConfig(sampler_eta=0.7))
    recorded = cfg.effective()["grpo"]["sampler"]
    assert recorded["method"] == "egoallo" and recorded["eta"] == 0.7  # what the run uses, not SamplerConfig()


def test_eta_range_is_checked_on_the_sde_window_steps_only():
    from diffgrpo.rollout import check_sampler
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
    with pytest.raises(ValueError, match="no split 'post_train'"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), train_split="post_train"))
    probe = ProbeConfig(splits=("train", "validation"), eval_every=5)
    with pytest.raises(ValueError, match="no split 'validation'"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), probe=probe))
    with pytest.raises(ValueError, match="conditions-per-iteration >= 2"):
        check_run(task, GRPOConfig(rewards=("toy_closeness",), conditions_per_iteration=1, diagnostics_every=1))
    with pytest.raises(ValueError, match="probe.eval_every = 0"):
        ProbeConfig(conditions_per_split=8)
