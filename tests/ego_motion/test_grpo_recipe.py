"""The MotionGRPO recipe end to end on a tiny config, and its resume."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tasks.ego_motion.grpo as ego_job
from tasks.ego_motion.rewards.perceptual_update import group_agreement
from tests.ego_motion.tiny_prior import write_tiny_prior


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    recipe = ego_job
    root = tmp_path_factory.mktemp("ego_grpo")
    prior = write_tiny_prior(root / "prior.safetensors")
    task = recipe.EgoMotionTaskConfig(window_frames=32)
    probe = recipe.ProbeConfig(splits=("post_train", "validation"), conditions_per_split=2, noises_per_condition=1,
                               eval_every=1)
    grpo = dataclasses.replace(recipe.default_grpo(), num_iterations=2, conditions_per_iteration=2, group_size=3,
                               micro_batch_size=6, checkpoint_every=1, probe=probe, diagnostics_every=1)
    perceptual = dataclasses.replace(recipe.PerceptualConfig(), width=16, num_blocks=1, ff_dim=32)
    cfg = recipe.Config(output_dir=root / "straight", prior=prior, eval_max_windows=2, use_tto=False,
                        task=task, grpo=grpo, perceptual=perceptual)
    return recipe, cfg, root


def test_one_run_writes_every_result(tiny):
    recipe, cfg, _ = tiny
    results = recipe.main(cfg)
    on_disk = json.loads((cfg.output_dir / "results.json").read_text())
    assert set(on_disk["base"]) == set(on_disk["grpo"]) == set(recipe.METRIC_UNITS)
    assert all(torch.isfinite(torch.tensor(list(on_disk["grpo"].values()))))
    assert on_disk["config"]["grpo"]["group_size"] == 3
    assert on_disk["config"]["grpo"]["sampler"]["method"] == "egoallo"  # the sampler the run really used
    history = json.loads((cfg.output_dir / "history.json").read_text())
    assert history["probe/iteration"] == [0.0, 1.0, 2.0] and "probe_diff/metric/validation/mpjpe_mm/ci_low" in history
    # the selected checkpoint: the lowest validation MPJPE of the probe, evaluated on test beside the last one
    values = history["probe/metric/validation/mpjpe_mm"]
    assert results["selected"]["iteration"] == values.index(min(values)) and results["selected"]["value"] == min(values)
    assert set(on_disk["grpo_selected"]) == set(recipe.METRIC_UNITS)
    assert (cfg.output_dir / "best" / "prior.safetensors").exists() and (cfg.output_dir / "prior.safetensors").exists()
    assert len(history["grad/cos_halves"]) == 2 and "perceptual/loss" in history
    assert results["grpo"] == on_disk["grpo"]
    assert (cfg.output_dir / "results.md").exists() and (cfg.output_dir / "curves.png").stat().st_size > 1000


def test_resume_continues_identically(tiny):
    recipe, cfg, root = tiny
    if not (cfg.output_dir / "checkpoints").exists():
        recipe.main(cfg)
    interrupted = dataclasses.replace(cfg, output_dir=root / "interrupted")
    recipe.main(dataclasses.replace(interrupted, grpo=dataclasses.replace(cfg.grpo, num_iterations=1)))
    recipe.main(dataclasses.replace(interrupted, resume=True))
    a = load_file(str(cfg.output_dir / "checkpoints" / "step_000002" / "shared.safetensors"))
    b = load_file(str(interrupted.output_dir / "checkpoints" / "step_000002" / "shared.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("task.perceptual.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_perceptual_options_warm_up_and_resume_identically(tiny):
    """Every negative kind on the samples' own heads, after a warm-up: the run finishes, the warm-up is
    reported, and a run killed after one iteration resumes (without warming up again) to the same critic."""
    recipe, cfg, root = tiny
    options = dict(perceptual_negatives=("x0_last", "members", "foreign"), perceptual_on_own_head=True,
                   perceptual_warmup_steps=2, perceptual_warmup_batch_size=2)
    straight = dataclasses.replace(cfg, output_dir=root / "critic_straight", **options)
    results = recipe.main(straight)
    assert set(results["critic_warmup"]) >= {"loss", "accuracy", "score_gap"}
    assert results["config"]["perceptual_negatives"] == ["x0_last", "members", "foreign"]
    interrupted = dataclasses.replace(straight, output_dir=root / "critic_interrupted")
    recipe.main(dataclasses.replace(interrupted, grpo=dataclasses.replace(cfg.grpo, num_iterations=1)))
    resumed = recipe.main(dataclasses.replace(interrupted, resume=True))
    assert resumed["critic_warmup"] == {}  # the checkpoint held the warmed-up critic
    a = load_file(str(straight.output_dir / "checkpoints" / "step_000002" / "shared.safetensors"))
    b = load_file(str(interrupted.output_dir / "checkpoints" / "step_000002" / "shared.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if not (cfg.output_dir / "checkpoints").exists():
        recipe.main(cfg)
    plain = load_file(str(cfg.output_dir / "checkpoints" / "step_000002" / "shared.safetensors"))
    assert not torch.equal(a["task.perceptual.model.head.2.weight"], plain["task.perceptual.model.head.2.weight"])
    with pytest.raises(ValueError, match="'job': {'perceptual_negatives'"):  # a resume must not mix two recipes
        recipe.main(dataclasses.replace(interrupted, resume=True, perceptual_negatives=("x0_last",)))


@pytest.mark.unchecked_annotations  # the Literal annotation would reject "hard" before __post_init__ names it
def test_perceptual_options_are_checked_at_start_up(tiny):
    recipe, cfg, _ = tiny
    with pytest.raises(ValueError, match="distinct kinds"):
        dataclasses.replace(cfg, perceptual_negatives=("x0_last", "hard"))
    with pytest.raises(ValueError, match="conditions-per-iteration >= 2"):
        dataclasses.replace(cfg, perceptual_negatives=("foreign",),
                            grpo=dataclasses.replace(cfg.grpo, conditions_per_iteration=1, micro_batch_size=3))
    with pytest.raises(ValueError, match="--perceptual-warmup-steps"):
        dataclasses.replace(cfg, use_perceptual_reward=False, perceptual_warmup_steps=5)
    heads_only = dataclasses.replace(cfg.task, post_train_heads_only=True)
    physics = dataclasses.replace(cfg.grpo, rewards=("physics_contact",))
    with pytest.raises(ValueError, match="--grpo.train-split train"):
        dataclasses.replace(cfg, task=heads_only, use_perceptual_reward=False, perceptual=recipe.PerceptualConfig(),
                            grpo=dataclasses.replace(physics, train_split="train"))
    with pytest.raises(ValueError, match="probe's metrics"):
        dataclasses.replace(cfg, task=heads_only, use_perceptual_reward=False, perceptual=recipe.PerceptualConfig(),
                            grpo=physics)


@pytest.mark.unchecked_annotations  # a stand-in with only the rewards of a RolloutBatch
def test_group_agreement_is_the_mean_within_group_pearson_correlation(tiny):
    recipe, _, _ = tiny
    visual = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.1, 0.9])
    pos = torch.tensor([2.0, 4.0, 7.0, 1.0, 1.0, 1.0])  # the second group has no spread: left out
    data = type("Data", (), {"rewards": {"ego_perceptual": visual, "ego_pos": pos}})()
    expected = float(torch.corrcoef(torch.stack([visual[:3], pos[:3]]).double())[0, 1])
    assert group_agreement(data, "ego_perceptual", "ego_pos", 3) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(group_agreement(data, "ego_perceptual", "ego_rot", 3))


def test_former_flag_spellings_of_the_learned_reward_still_parse(caplog):
    from diffgrpo import cli

    old = ["--critic-warmup-steps", "2", "--omega-vis", "2.0", "--critic-negatives", "x0_last", "members",
           "--critic-on-own-head"]
    new = ["--perceptual-warmup-steps", "2", "--perceptual-omega", "2.0", "--perceptual-negatives", "x0_last",
           "members", "--perceptual-on-own-head"]
    parsed = cli.parse(ego_job.Config, renamed=ego_job.renamed_flags(), args=old)
    assert parsed == cli.parse(ego_job.Config, args=new)
    assert "--critic-warmup-steps is deprecated; use --perceptual-warmup-steps" in caplog.text
    off = cli.parse(ego_job.Config, renamed=ego_job.renamed_flags(), args=["--no-use-visual-reward"])
    assert not off.use_perceptual_reward
    assert ego_job.renamed_flags("--base.")["--base.critic-"] == "--base.perceptual-"


def test_reward_params_reach_the_joint_rewards_and_are_checked_at_start_up(tiny):
    _, cfg, _ = tiny
    with pytest.raises(ValueError, match="ego_physics, which this run does not use"):
        dataclasses.replace(cfg, reward_params=("ego_physics.omega=2.0",))
    with pytest.raises(ValueError, match="takes no parameter sigma"):
        dataclasses.replace(cfg, reward_params=("ego_pos.sigma=2.0",))
    with pytest.raises(ValueError, match="repeats --perceptual-omega"):
        dataclasses.replace(cfg, reward_params=("ego_perceptual.omega=2.0",))
    dataclasses.replace(cfg, reward_params=("ego_pos.omega=20.0",))  # a used reward's own parameter: accepted


def test_the_exported_prior_evaluates_to_the_jobs_own_numbers_and_every_recipe_takes_it(tiny):
    """prior.safetensors is the model the job's final evaluation scored: the evaluation recipe on it, with the
    job's seed, windows and batch size, gives the job's held-out numbers bit for bit; the main job, inference
    and RLPF accept it as --prior."""
    import recipes.eval_ego_motion as eval_recipe
    import recipes.infer_ego_motion as infer_recipe
    import recipes.rlpf_ego_motion as rlpf_recipe
    from tasks.ego_motion.model.network import load_denoiser

    recipe, cfg, root = tiny
    if not (cfg.output_dir / "results.json").exists():
        recipe.main(cfg)
    on_disk = json.loads((cfg.output_dir / "results.json").read_text())
    exported = cfg.output_dir / "prior.safetensors"
    assert on_disk["prior"] == str(exported) and not exported.with_name("prior.safetensors.tmp").exists()
    stitch = dataclasses.replace(infer_recipe.StitchConfig(), window_frames=cfg.task.window_frames)
    evaluation = eval_recipe.run_eval(eval_recipe.Config(
        prior=exported, output_dir=root / "eval_exported", seeds=(cfg.eval_seed,), batch_size=32,
        max_windows=cfg.eval_max_windows, use_tto=False, render=False, task=cfg.task, stitch=stitch))
    per_window = evaluation["per_window_first_seed"]["base"]
    assert {name: float(torch.tensor(values).mean()) for name, values in per_window.items()} == on_disk["grpo"]
    assert on_disk["grpo"] != on_disk["base"]  # the file holds the post-trained weights, not the prior's

    again = recipe.main(dataclasses.replace(cfg, prior=exported, output_dir=root / "from_exported",
                                            grpo=dataclasses.replace(cfg.grpo, num_iterations=1)))
    assert again["base"] == on_disk["grpo"]  # the main job starts from the exported weights
    rlpf = rlpf_recipe.Config(base=dataclasses.replace(rlpf_recipe.default_base(), prior=exported))
    assert rlpf.base.prior == exported  # RLPF's --base.prior is the main job's --prior, checked at start-up
    infer_recipe.Config(mps_dir=root, prior=exported, task=cfg.task, stitch=stitch)
    task = recipe.EgoMotionTask(cfg.task)  # inference's step 3 on a test head trajectory with the loaded file
    head = task.load_examples("test", torch.arange(1))["T_world_cpf"]
    sample = infer_recipe.sample_sequence(task, load_denoiser(exported).eval(), head,
                                          generator=torch.Generator().manual_seed(0), stitch_cfg=stitch)
    assert sample.decoded["joints_world"].shape[:2] == (1, cfg.task.window_frames)
    assert torch.isfinite(sample.decoded["joints_world"]).all()
