"""RLPF: the alignment guard's pieces and the recipe end to end on a tiny config."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import recipes.rlpf_ego_motion as rlpf_ego_motion_recipe
import tasks.ego_motion.grpo as ego_job
from tasks.ego_motion.body.geometry import make_transform
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator
from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualTrainer
from tasks.ego_motion.rewards.perceptual_data import transplant, warm_up_perceptual, yaw_free_head_frame
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import EgoMotionTask
from tests.ego_motion.tiny_prior import write_tiny_prior


def _head(yaw: float, x: float, y: float, z: float = 1.6) -> torch.Tensor:
    """A CPF looking along world (cos yaw, sin yaw, 0): its local +Z is that direction."""
    forward = torch.tensor([math.cos(yaw), math.sin(yaw), 0.0])
    up = torch.tensor([0.0, 0.0, 1.0])
    R = torch.stack([torch.linalg.cross(up, forward), up, forward], dim=-1)  # columns: local x, y, z
    return make_transform(R, torch.tensor([x, y, z]))


def test_transplant_moves_a_motion_rigidly_onto_the_other_heads_ground_frame():
    source, target = _head(0.3, 2.0, -1.0), _head(-1.2, -0.5, 4.0, z=1.5)
    joints = torch.randn(1, 5, 22, 3, generator=torch.Generator().manual_seed(0))
    moved = transplant(joints, source[None], target[None])
    # rigid: pairwise distances kept; heights kept (rotation about +Z and horizontal shift only)
    torch.testing.assert_close(torch.cdist(moved[0, 2], moved[0, 2]), torch.cdist(joints[0, 2], joints[0, 2]))
    torch.testing.assert_close(moved[..., 2], joints[..., 2])
    # the source head's ground frame lands on the target's
    head_point = torch.cat([source[:2, 3], torch.zeros(1)])[None, None, None]
    landed = transplant(head_point, source[None], target[None])[0, 0, 0]
    torch.testing.assert_close(landed, torch.cat([target[:2, 3], torch.zeros(1)]))
    frame = yaw_free_head_frame(target[None])[0]
    torch.testing.assert_close(frame[:3, 2], torch.tensor([0.0, 0.0, 1.0]))


def test_alignment_warm_up_learns_to_prefer_the_truth_and_checks_its_inputs():
    gen = torch.Generator().manual_seed(0)
    W, T = 6, 8
    heads = torch.stack([torch.stack([_head(0.1 * w, 0.05 * t + w, 0.0) for t in range(T + 1)]) for w in range(W)])
    truth = heads[:, 1:, None, :3, 3] + 0.1 * torch.randn(W, T, 22, 3, generator=gen)
    truth[..., 2] = truth[..., 2].clamp(min=0.0)
    far = truth + torch.tensor([0.0, 0.0, 0.8])  # a "prior" that floats: easy to tell apart
    critic = PerceptualTrainer(dataclasses.replace(PerceptualConfig(), width=16, num_blocks=1, ff_dim=32))
    stats = warm_up_perceptual(critic, truth, heads, far, steps=30, batch_size=4,
                                     generator=torch.Generator().manual_seed(1))
    assert len(stats) == 30 and stats[-1]["score_gap"] > stats[0]["score_gap"]
    assert (critic.score(truth, heads) > critic.score(far, heads)).all()
    with pytest.raises(ValueError, match="steps >= 1"):
        warm_up_perceptual(critic, truth, heads, far, steps=0, batch_size=2, generator=gen)


@pytest.mark.unchecked_annotations  # the library's own shape error, not the annotation checker's
def test_alignment_warm_up_names_mismatched_windows():
    W, T = 3, 8
    heads = torch.eye(4).expand(W, T + 1, 4, 4).clone()
    truth = torch.zeros(W, T, 22, 3)
    critic = PerceptualTrainer(dataclasses.replace(PerceptualConfig(), width=16, num_blocks=1, ff_dim=32))
    with pytest.raises(ValueError, match="same W windows"):
        warm_up_perceptual(critic, truth, heads, truth[:-1], steps=1, batch_size=2,
                                 generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    recipe = rlpf_ego_motion_recipe
    root = tmp_path_factory.mktemp("rlpf")
    prior = write_tiny_prior(root / "prior.safetensors")
    base = recipe.default_base()
    probe = dataclasses.replace(base.grpo.probe, conditions_per_split=2, noises_per_condition=1)
    grpo = dataclasses.replace(base.grpo, num_iterations=1, conditions_per_iteration=2, group_size=3,
                               micro_batch_size=6, checkpoint_every=1, probe=probe)
    base = dataclasses.replace(base, prior=prior, eval_max_windows=2, grpo=grpo, rollout_sampling_steps=10,
                               task=dataclasses.replace(base.task, window_frames=32))
    alignment = recipe.AlignmentConfig(warmup_steps=2, batch_size=4, perceptual=dataclasses.replace(
        PerceptualConfig(), width=16, num_blocks=1, ff_dim=32))
    cfg = recipe.Config(output_dir=root / "runs", results=root / "rlpf.json", table_output=root / "table.md",
                        figure=root / "before_after.png", seeds=(0,), base=base, alignment=alignment)
    return recipe, cfg


@pytest.mark.slow
def test_rlpf_recipe_runs_every_variant_with_its_rewards_and_leaves_the_perceptual_model_frozen(tiny, monkeypatch):
    recipe, cfg = tiny
    critics = []
    original = recipe.alignment_perceptual_model

    def spy(*args, **kwargs):
        critic, stats = original(*args, **kwargs)
        critics.append((critic, {k: v.clone() for k, v in critic.model.state_dict().items()}))
        return critic, stats

    monkeypatch.setattr(recipe, "alignment_perceptual_model", spy)
    summary = recipe.main(cfg)
    assert [r["variant"] for r in summary["runs"]] == list(recipe.VARIANTS)
    expected = {"physics": set(recipe.PHYSICS_REWARDS),
                "physics+alignment": {*recipe.PHYSICS_REWARDS, "ego_perceptual"},
                "physics+alignment+joint": {*recipe.PHYSICS_REWARDS, "ego_perceptual", *recipe.GROUND_TRUTH_REWARDS}}
    for run in summary["runs"]:
        assert {k.removeprefix("reward/") for k in run["final_rewards"]} >= expected[run["variant"]]
        assert not any(k.removeprefix("reward/") not in expected[run["variant"]] and "/" not in
                       k.removeprefix("reward/") for k in run["final_rewards"]), run["final_rewards"]
        for name in recipe.REPORTED:
            assert math.isfinite(run["metrics"][name]), (run["variant"], name)
            assert math.isfinite(run["metrics"]["tto/" + name]), (run["variant"], name)  # after test-time optimisation
    critic, before = critics[0]
    for k, v in critic.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # GRPO scored with the perceptual model but never trained it
    for variant in recipe.VARIANTS:  # one before/after picture per variant
        assert (cfg.output_dir.parent / f"before_after_{variant.replace('+', '_')}.png").stat().st_size > 1000
    table = (cfg.table_output).read_text()
    assert "| prior |" in table and "| physics+alignment+joint (1 seeds) |" in table
    assert table.count("| physics (1 seeds) |") == 2 and "| model (after TTO) |" in table
    assert json.loads(cfg.results.read_text())["prior"]["mpjpe_mm"] == summary["prior"]["mpjpe_mm"]


def test_rlpf_config_refuses_what_it_would_ignore():
    recipe = rlpf_ego_motion_recipe
    with pytest.raises(ValueError, match="unknown or empty"):
        recipe.Config(variants=("physics", "joint-only"))
    with pytest.raises(ValueError, match="rewards come from --variants"):
        recipe.Config(base=dataclasses.replace(recipe.default_base(), use_perceptual_reward=True))
    with pytest.raises(ValueError, match="tracking-mode"):
        recipe.Config(rewards=recipe.RewardParams(tracking_mode="binary"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--rewards.planted-omega"):
        recipe.Config(rewards=recipe.RewardParams(planted=True, planted_omega=0.0))
    with pytest.raises(ValueError, match="--rewards.refine"):
        recipe.Config(rewards=recipe.RewardParams(refine="guidance"))  # type: ignore[arg-type]


def test_a_finished_run_is_read_back_only_under_its_own_settings(tmp_path, caplog):
    recipe = rlpf_ego_motion_recipe
    cfg = recipe.Config()
    fingerprint = recipe.run_fingerprint(cfg, "physics", 0)
    assert recipe.read_finished(tmp_path, fingerprint) is None  # nothing there yet
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {"mpjpe_mm": 1.0}, "fingerprint": fingerprint}))
    assert recipe.read_finished(tmp_path, fingerprint)["metrics"] == {"mpjpe_mm": 1.0}
    planted = recipe.run_fingerprint(recipe.Config(rewards=recipe.RewardParams(planted=True)), "physics", 0)
    with pytest.raises(ValueError, match=r"other settings \(differing: \['rewards'\]\)"):
        recipe.read_finished(tmp_path, planted)
    assert recipe.run_fingerprint(cfg, "physics", 1) != fingerprint  # the seed is part of the run
    assert "refine" not in fingerprint["rewards"]  # at 'none', runs written before the option still read back
    refined = recipe.run_fingerprint(recipe.Config(rewards=recipe.RewardParams(refine="tto")), "physics", 0)
    assert refined["rewards"]["refine"] == "tto" and refined != fingerprint
    (tmp_path / "results.json").write_text(json.dumps({"metrics": {}}))  # written before settings were recorded
    with caplog.at_level("WARNING"):
        assert recipe.read_finished(tmp_path, planted) == {"metrics": {}}
    assert "records no settings" in caplog.text


def test_the_planted_reward_joins_every_variant_when_asked():
    recipe = rlpf_ego_motion_recipe
    for planted in (False, True):
        cfg = recipe.Config(rewards=recipe.RewardParams(planted=planted, planted_omega=3.0))
        for variant in recipe.VARIANTS:
            specs = {spec.name: spec for spec in recipe.reward_specs(variant, cfg, evaluator=None, perceptual=None)}
            assert ("physics_planted" in specs) == planted, variant
            if planted:
                assert specs["physics_planted"].params["omega"] == 3.0


def test_refined_physics_rewards_score_the_test_time_optimised_motion(tiny, monkeypatch):
    """--rewards.refine tto: the rewards' evaluator refines each batch (here: a stand-in that counts its rows), the
    held-out evaluator does not (it scores both variants itself)."""
    recipe, cfg = tiny
    refined_rows = []
    original = recipe.refine_decoded

    def counting(task, decoded, T_world_cpf, tto_cfg=None):
        refined_rows.append(len(decoded["T_world_root"]))
        return original(task, decoded, T_world_cpf, dataclasses.replace(TTOConfig(), num_iterations=2))

    monkeypatch.setattr(recipe, "refine_decoded", counting)
    cfg = dataclasses.replace(cfg, output_dir=cfg.output_dir.parent / "refined", variants=("physics",),
                              rewards=recipe.RewardParams(refine="tto"), figure=None, table_output=None)
    task = EgoMotionTask(cfg.base.task)
    held_out = PhysicsEvaluator(task.body, cfg.physics)
    training = recipe.training_evaluator(task, cfg, held_out)
    assert training.refine is not None and training.humanoids is held_out.humanoids
    run = recipe.run_variant(task, held_out, None, "physics", 0, cfg)
    grpo = cfg.base.grpo
    rollout_rows = grpo.conditions_per_iteration * grpo.group_size
    assert rollout_rows in refined_rows  # the rollouts' rewards were computed on refined motion
    assert math.isfinite(run["metrics"]["tto/tracking_graded"]) and run["fingerprint"]["rewards"]["refine"] == "tto"
    with pytest.raises(ValueError, match="without refine"):
        recipe.evaluate(task, None, training, cfg)
    with pytest.raises(ValueError, match="without refine"):  # refused before a run trains, not after
        recipe.training_evaluator(task, cfg, training)


def test_heads_only_post_training_reads_no_body(tiny, monkeypatch):
    """Ground-truth-free post-training: the post_train batches hold the head trajectory alone, the physics
    variant trains on them, and the variant whose rewards read the body is refused at start-up."""
    recipe, cfg = tiny
    heads_only = dataclasses.replace(cfg.base.task, post_train_heads_only=True)
    task = recipe.EgoMotionTask(heads_only)
    batch = task.load_examples("post_train", torch.tensor([0, 1]))
    assert set(batch) == {"T_world_cpf"}
    assert set(task.load_examples("test", torch.tensor([0]))) > {"T_world_cpf", "joints_world"}  # evaluation keeps it
    assert task.num_examples("post_train") == len(task.windows("post_train"))  # the feet-based filter is off
    run = dataclasses.replace(cfg, output_dir=cfg.output_dir.parent / "heads_only", variants=("physics",),
                              results=cfg.output_dir.parent / "heads_only.json", table_output=None, figure=None,
                              base=dataclasses.replace(cfg.base, task=heads_only))
    summary = recipe.main(run)
    assert [r["variant"] for r in summary["runs"]] == ["physics"]
    assert math.isfinite(summary["runs"][0]["metrics"]["mpjpe_mm"])
    with pytest.raises(ValueError, match="joint rewards read the body"):
        dataclasses.replace(run, variants=("physics+alignment+joint",))
    main_job = ego_job
    with pytest.raises(ValueError, match=r"ego_pos.*need them"):
        dataclasses.replace(main_job.Config(), task=heads_only)


def test_rlpf_validation_pairs_differences_by_hand():
    from recipes.benchmarks.rlpf_validation import paired

    d = paired([1.0, 2.0, 4.0, float("inf")], [0.0, 1.0, 1.0, 3.0])  # differences 1, 1, 3; the inf pair left out
    half = 1.96 * (4.0 / 3.0) ** 0.5 / 3.0**0.5  # sd of (1, 1, 3) is sqrt(4/3)
    assert d["pairs"] == 3 and d["mean"] == pytest.approx(5.0 / 3.0)
    assert (d["low"], d["high"]) == pytest.approx((5.0 / 3.0 - half, 5.0 / 3.0 + half))
    assert math.isnan(paired([float("nan")], [0.0])["mean"])


def test_held_out_means_leave_invalid_samples_out(monkeypatch):
    """An invalid test sample (every physics measure inf) is left out of the means, and counted in ``invalid``."""
    recipe = rlpf_ego_motion_recipe
    per_sample = {"mpjpe_mm": torch.tensor([100.0, 500.0, 200.0]),
                  "tracking_residual_per_weight": torch.tensor([0.1, math.inf, 0.3]),
                  "invalid": torch.tensor([0.0, 1.0, 0.0])}

    class Evaluated:
        metrics = {"base": per_sample, "tto": {k: v / 2 for k, v in per_sample.items()}}

    monkeypatch.setattr(recipe, "evaluate_windows", lambda *args, **kwargs: Evaluated())
    cfg = recipe.Config()
    evaluator = type("Plain", (), {"refine": None, "evaluate": None})()
    task = type("Task", (), {"sampling_chain": lambda self: None})()
    means = recipe.evaluate(task, None, evaluator, cfg)
    assert means["mpjpe_mm"] == pytest.approx(150.0) and means["tracking_residual_per_weight"] == pytest.approx(0.2)
    assert means["invalid"] == pytest.approx(1 / 3) and means["tto/mpjpe_mm"] == pytest.approx(75.0)
