"""The perceptual model's training data: rollout negatives on the right heads, foreign truths, per-negative heads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tasks.ego_motion.rewards.registered  # noqa: F401  (registers ego_pos)
from diffgrpo.config import GRPOConfig, PerturbConfig
from diffgrpo.rewards import RewardSet, RewardSpec
from diffgrpo.rng import make_generator
from diffgrpo.train_step import collect, make_perturber
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualTrainer
from tasks.ego_motion.rewards.perceptual_data import foreign_truths, next_other_window, rollout_negatives, transplant
from tasks.ego_motion.task import EgoMotionTask, EgoMotionTaskConfig
from tests.ego_motion.tiny_prior import write_tiny_prior

B, G = 2, 3


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    """One iteration's rollouts of a tiny prior on 2 post-train windows x 3 members, heads Perlin-perturbed
    per member, and the same without perturbation."""
    task = EgoMotionTask(dataclasses.replace(EgoMotionTaskConfig(window_frames=32), num_sampling_steps=10))
    model = load_denoiser(write_tiny_prior(tmp_path_factory.mktemp("critic") / "prior.safetensors"))
    batch = task.load_examples("post_train", torch.tensor([0, 5]))
    rewards = RewardSet.from_specs([RewardSpec("ego_pos")])

    def run(perturb: PerturbConfig):
        cfg = GRPOConfig(group_size=G, conditions_per_iteration=B, micro_batch_size=B * G, perturb=perturb,
                         rewards=("ego_pos",))
        return collect(task, model, task.sampling_chain(), batch, cfg=cfg, rewards=rewards,
                       perturber=make_perturber(cfg), generator=make_generator(0, "test"), group_id_offset=0)

    perturbed = run(PerturbConfig(name="perlin", scale=0.05, frequency=1 / 8))
    clean = run(PerturbConfig(name="none", scale=0.0))
    return task, batch, perturbed, clean


def test_negatives_have_the_documented_count_order_and_heads(rollouts):
    task, batch, data, _ = rollouts
    joints, heads = rollout_negatives(task, data, batch, G, ("x0_last", "members", "foreign"), on_own_head=True)
    T = batch["joints_world"].shape[1]
    assert joints.shape == (B, 3 + (G - 1) + 1, T, 22, 3) and heads.shape == (B, 3 + (G - 1) + 1, T + 1, 4, 4)
    member_heads = data.batch["T_world_cpf"].view(B, G, T + 1, 4, 4)
    assert torch.equal(heads[:, :3], member_heads[:, :1].expand(B, 3, T + 1, 4, 4))  # the first member's head
    assert torch.equal(heads[:, 3:5], member_heads[:, 1:])
    assert torch.equal(joints[:, 3:5], data.decoded["joints_world"].view(B, G, T, 22, 3)[:, 1:])  # what was scored
    assert torch.equal(heads[:, 5], batch["T_world_cpf"])
    assert torch.equal(joints[:, 5], foreign_truths(batch["joints_world"], batch["T_world_cpf"], torch.tensor([1, 0])))
    # members are adjacent rows: the perturbation moves translations only, so each member's head rotations
    # are its own window's (windows 0 and 5 differ)
    rotations = data.batch["T_world_cpf"][:, :, :3, :3]
    for b in range(B):
        for g in range(G):
            assert torch.equal(rotations[b * G + g], batch["T_world_cpf"][b, :, :3, :3])
    assert not torch.equal(batch["T_world_cpf"][0, :, :3, :3], batch["T_world_cpf"][1, :, :3, :3])
    assert not torch.equal(member_heads[:, 0], batch["T_world_cpf"])  # the perturbation did move the heads
    # the x0_last negatives are the first member's last 3 x0 predictions, decoded on its own head
    own = task.decode_x0(data.trajectory.x0_preds[::G, -3:], {"T_world_cpf": member_heads[:, 0]})["joints_world"]
    assert torch.equal(joints[:, :3], own)


def test_clean_head_decoding_differs_only_where_the_head_was_perturbed(rollouts):
    task, batch, perturbed, clean = rollouts
    for data, same in ((clean, True), (perturbed, False)):
        own, own_heads = rollout_negatives(task, data, batch, G, ("x0_last", "members"), on_own_head=True)
        paper, paper_heads = rollout_negatives(task, data, batch, G, ("x0_last", "members"), on_own_head=False)
        assert torch.equal(paper_heads, batch["T_world_cpf"][:, None].expand_as(paper_heads))
        assert torch.allclose(own, paper, atol=1e-5) == same
        assert torch.equal(own_heads, paper_heads) == same


def test_foreign_truth_starts_under_this_head_but_is_the_other_windows_motion(rollouts):
    _, batch, _, _ = rollouts
    joints, heads = batch["joints_world"], batch["T_world_cpf"]
    moved = foreign_truths(joints, heads, torch.tensor([1, 0]))
    assert torch.allclose(moved, transplant(joints[[1, 0]], heads[[1, 0], 1], heads[:, 1]))
    # a rigid move: pairwise joint distances within each frame are the other window's
    assert torch.allclose(torch.cdist(moved[0], moved[0]), torch.cdist(joints[1], joints[1]), atol=1e-4)
    with pytest.raises(ValueError, match="own truth"):
        foreign_truths(joints, heads, torch.tensor([0, 0]))


def test_foreign_partner_skips_rows_holding_the_same_window():
    joints = torch.stack([torch.zeros(4, 22, 3), torch.zeros(4, 22, 3), torch.ones(4, 22, 3)])  # rows 0, 1 equal
    assert next_other_window(joints).tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="two different windows"):
        next_other_window(joints[:2])


@pytest.mark.unchecked_annotations  # the errors asserted are the function's own, not the annotation checker's
def test_negatives_reject_unknown_kinds_and_a_single_condition_for_foreign(rollouts):
    task, batch, data, _ = rollouts
    with pytest.raises(ValueError, match="unknown or none"):
        rollout_negatives(task, data, batch, G, ("x0_last", "hard"), on_own_head=True)
    one = {k: v[:1] for k, v in batch.items()}
    sliced = dataclasses.replace(data, batch={k: v[:G] for k, v in data.batch.items()})
    with pytest.raises(ValueError, match="at least 2 conditions"):
        rollout_negatives(task, sliced, one, G, ("foreign",), on_own_head=True)


@pytest.mark.unchecked_annotations  # the shape error asserted is the trainer's own, not the annotation checker's
def test_per_negative_heads_equal_to_the_positives_give_the_same_step(rollouts):
    """Passing each negative's head explicitly, when it is the positive's, changes nothing bit for bit;
    other heads change the loss."""
    _, batch, data, _ = rollouts
    T = batch["joints_world"].shape[1]
    negatives = data.decoded["joints_world"].view(B, G, T, 22, 3)
    config = PerceptualConfig(width=16, num_blocks=1, ff_dim=32)
    implicit, explicit, moved = PerceptualTrainer(config), PerceptualTrainer(config), PerceptualTrainer(config)
    same_heads = batch["T_world_cpf"][:, None].expand(B, G, T + 1, 4, 4)
    a = implicit.train_step(batch["joints_world"], batch["T_world_cpf"], negatives)
    b = explicit.train_step(batch["joints_world"], batch["T_world_cpf"], negatives, same_heads)
    c = moved.train_step(batch["joints_world"], batch["T_world_cpf"], negatives,
                         data.batch["T_world_cpf"].view(B, G, T + 1, 4, 4))
    assert a == b and a["loss"] != c["loss"]
    for p, q in zip(implicit.model.parameters(), explicit.model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="one head window per negative"):
        implicit.train_step(batch["joints_world"], batch["T_world_cpf"], negatives, same_heads[:, :1])
