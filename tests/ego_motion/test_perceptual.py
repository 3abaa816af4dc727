"""Tests of the perceptual model: InfoNCE against hand-computed values and its gradient signs, the
perceptual reward's range, invariance of the score to world yaw and horizontal position, learning to
rank real motion above corrupted copies, the safetensors/JSON state round trip with a bit-identical
next step, and input validation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from tasks.ego_motion.body.body_model import BodyModel, load_body_model
from tasks.ego_motion.body.geometry import (
    apply_transform,
    axis_angle_to_matrix,
    make_transform,
    rotation_about_z,
)
from tasks.ego_motion.rewards.perceptual import (
    PerceptualConfig,
    PerceptualTrainer,
    canonical_joint_features,
    info_nce_loss,
    perceptual_reward,
)

TAU = 0.07
# Small enough for the ranking test to train in a few seconds on 2 busy CPU cores.
TINY = PerceptualConfig(width=32, num_heads=4, num_blocks=2, ff_dim=64, learning_rate=1e-3, seed=0)
# Joints 1..21 whose offset from the parent is a lower-leg or forearm bone (knees->ankles,
# elbows->wrists) plus the feet; stretched to build "limb-length distortion" negatives.
DISTAL_JOINTS = (7, 8, 10, 11, 20, 21)


@pytest.fixture(scope="module")
def body() -> BodyModel:
    return load_body_model(dtype=torch.float32)


def _walk(body: BodyModel, n: int, T: int, seed: int, shaped_scale: float = 1.0):
    """n smooth walking-like motions: (joints (n, T, 22, 3), T_world_cpf (n, T+1, 4, 4), pieces).

    Each joint swings sinusoidally (amplitude <= 0.35 rad, 0.5-1.5 Hz), the pelvis walks at
    0.6-1.4 m/s along a slowly turning heading; the body's +Y is turned to world +Z.
    """
    g = torch.Generator().manual_seed(seed)
    frames = torch.arange(T + 1, dtype=torch.float32) / 30.0  # (T+1,) seconds
    amp = torch.rand(n, 1, 21, 3, generator=g) * 0.35
    freq = 0.5 + torch.rand(n, 1, 21, 3, generator=g)
    phase = torch.rand(n, 1, 21, 3, generator=g) * 2 * math.pi
    body_rotmats = axis_angle_to_matrix(amp * torch.sin(2 * math.pi * freq * frames[:, None, None] + phase))
    yaw0 = torch.rand(n, 1, generator=g) * 2 * math.pi
    turn = (torch.rand(n, 1, generator=g) - 0.5) * 0.8  # rad/s
    yaw = yaw0 + turn * frames  # (n, T+1)
    speed = 0.6 + 0.8 * torch.rand(n, 1, generator=g)
    heading = torch.stack([torch.cos(yaw), torch.sin(yaw), torch.zeros_like(yaw)], -1)  # (n, T+1, 3)
    position = torch.cumsum(heading * speed[..., None] / 30.0, dim=1)
    position[..., 2] = 0.95
    body_y_up_to_z_up = axis_angle_to_matrix(torch.tensor([math.pi / 2, 0.0, 0.0]))
    # Body forward (+Z) points along world -Y after the tilt; turning by yaw + 90 deg faces heading.
    R_world_root = rotation_about_z(yaw + math.pi / 2) @ body_y_up_to_z_up
    T_world_root = make_transform(R_world_root, position)
    betas = torch.zeros(n, 1, body.num_betas)
    shaped = body.shaped_joints(betas)  # (n, 1, 52, 3)
    if shaped_scale != 1.0:
        parents = torch.tensor(body.parents[1:])
        offsets = shaped[..., 1:, :] - shaped[..., parents, :]
        scale = torch.ones(51)
        scale[[j - 1 for j in DISTAL_JOINTS]] = shaped_scale
        rest = [shaped[..., 0, :]]
        for j in range(1, 52):  # parents come first in SMPL-H order
            rest.append(rest[body.parents[j]] + offsets[..., j - 1, :] * scale[j - 1])
        shaped = torch.stack(rest, dim=-2)
    joints = body.forward_kinematics(body_rotmats, shaped_joints=shaped, T_world_root=T_world_root).t_world_joint
    T_world_cpf = body.T_world_cpf_from_root(T_world_root, body_rotmats, betas)
    return joints[:, 1:, :22].contiguous(), T_world_cpf, (body_rotmats, shaped, T_world_root)


def _negatives(joints: torch.Tensor, stretched: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, 3, T, 22, 3) negatives with artefacts the perceptual model must learn to see: per-frame jitter
    (1.5 cm), the same motion lagging the head by 3 frames (0.1 s), and ``stretched`` (the same
    rotations and root with 15 % longer forearms and shins, from ``_walk(shaped_scale=1.15)``)."""
    g = torch.Generator().manual_seed(seed)
    jitter = joints + 0.015 * torch.randn(joints.shape, generator=g)
    lagged = torch.cat([joints[:, :1].expand(-1, 3, -1, -1), joints[:, :-3]], dim=1)
    return torch.stack([jitter, lagged, stretched], dim=1)


def _random_transforms(n: int, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return make_transform(
        axis_angle_to_matrix(torch.randn(n, T + 1, 3, generator=g)), torch.randn(n, T + 1, 3, generator=g)
    )


# --------------------------------------------------------------------------------------- InfoNCE


def test_info_nce_matches_hand_computed_value():
    # Row 0: s_pos = 1, three negatives at 0 -> log(1 + 3 exp(-1 / tau)).
    # Row 1: all four scores equal -> log(4).
    score_pos = torch.tensor([1.0, 0.3], dtype=torch.float64)
    score_neg = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.3, 0.3]], dtype=torch.float64)
    expected = 0.5 * (math.log(1 + 3 * math.exp(-1 / TAU)) + math.log(4))
    assert info_nce_loss(score_pos, score_neg, TAU).item() == pytest.approx(expected, rel=1e-12)


def test_info_nce_is_stable_for_large_logits_and_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    score_pos, score_neg = 50 * torch.randn(5, generator=g), 50 * torch.randn(5, 4, generator=g)
    loss = info_nce_loss(score_pos, score_neg, TAU)  # logits up to ~2000: naive exp overflows
    assert torch.isfinite(loss)
    logits = torch.cat([score_pos[:, None], score_neg], 1) / TAU
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).item(), rel=1e-6
    )


def test_info_nce_gradient_pushes_positive_up_and_negatives_down():
    score_pos = torch.tensor([0.1, -0.2, 0.5], requires_grad=True)
    score_neg = torch.tensor([[0.2, 0.0], [0.3, -0.4], [0.6, 0.1]], requires_grad=True)
    info_nce_loss(score_pos, score_neg, TAU).backward()
    assert (score_pos.grad < 0).all()  # descending the loss raises the positive
    assert (score_neg.grad > 0).all()  # ... and lowers every negative
    # The gradient of one row sums to zero: only differences of scores matter.
    torch.testing.assert_close(score_pos.grad + score_neg.grad.sum(1), torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.unchecked_annotations
def test_info_nce_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match=r"\(B,\) and \(B, M\)"):
        info_nce_loss(torch.zeros(3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least one"):
        info_nce_loss(torch.zeros(3), torch.zeros(3, 0))
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(torch.zeros(3), torch.zeros(3, 2), temperature=0.0)


# --------------------------------------------------------------------------------- perceptual reward


def test_perceptual_reward_values_and_range():
    scores = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    torch.testing.assert_close(perceptual_reward(scores, 2.0), torch.exp(2.0 * scores))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        perceptual_reward(torch.tensor([3.0]), 1.0)  # a raw logit, not a tanh-squashed score
    with pytest.raises(ValueError, match="perceptual_omega"):
        perceptual_reward(scores, -1.0)


# ------------------------------------------------------------------------- features and invariance


def test_canonical_features_on_a_hand_built_frame():
    # Head at (1, 2, 1.6) looking along world +Y (CPF local +Z = forward). A joint 1 m in front of
    # it at height 1.0, moving forward at 1.5 m/s, sits at canonical (1, 0, 1.0) with velocity (1.5, 0, 0).
    R_facing_x = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    R_facing_y = rotation_about_z(torch.tensor(math.pi / 2, dtype=torch.float64)) @ R_facing_x
    T_world_cpf = make_transform(R_facing_y, torch.tensor([1.0, 2.0, 1.6], dtype=torch.float64)).expand(1, 3, 4, 4)
    joint_t = torch.tensor([[1.0, 3.0, 1.0], [1.0, 3.05, 1.0]], dtype=torch.float64)  # (T=2, 3)
    joints = joint_t[None, :, None].expand(1, 2, 22, 3)
    feats = canonical_joint_features(joints, T_world_cpf, fps=30.0)
    expected = torch.tensor([[1.0, 0.0, 1.0, 1.5, 0.0, 0.0], [1.05, 0.0, 1.0, 1.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(feats[0, :, 0], expected)


def test_score_is_invariant_to_world_yaw_and_horizontal_translation(body):
    joints, T_world_cpf, _ = _walk(body, n=3, T=16, seed=1)
    joints, T_world_cpf = joints.double(), T_world_cpf.double()
    trainer = PerceptualTrainer(PerceptualConfig(seed=3))
    trainer.model.double()
    R = rotation_about_z(torch.tensor(1.234, dtype=torch.float64))
    T_new_world = make_transform(R, torch.tensor([3.0, -7.5, 0.0], dtype=torch.float64))
    moved = trainer.score(apply_transform(T_new_world, joints), T_new_world @ T_world_cpf)
    base = trainer.score(joints, T_world_cpf)
    torch.testing.assert_close(moved, base, atol=1e-10, rtol=0)
    # Height above the floor is real information, so a vertical shift must change the score.
    lifted = make_transform(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64))
    assert (trainer.score(apply_transform(lifted, joints), lifted @ T_world_cpf) - base).abs().max() > 1e-6


# -------------------------------------------------------------------------------------- learning


def test_perceptual_model_learns_to_rank_ground_truth_above_corrupted_copies(body):
    B, T = 6, 24
    joints, T_world_cpf, _ = _walk(body, n=B, T=T, seed=2)
    stretched, _, _ = _walk(body, n=B, T=T, seed=2, shaped_scale=1.15)
    negatives = _negatives(joints, stretched, seed=5)  # (B, 3, T, 22, 3)
    trainer = PerceptualTrainer(TINY)
    first = trainer.train_step(joints, T_world_cpf, negatives)
    for _ in range(19):
        stats = trainer.train_step(joints, T_world_cpf, negatives)
    assert stats["loss"] < 0.5 * first["loss"]
    assert trainer.num_steps == 20

    def ranking(joints, T_world_cpf, negatives):
        pos = trainer.score(joints, T_world_cpf)  # (B,)
        neg = trainer.score(negatives.flatten(0, 1), T_world_cpf.repeat_interleave(3, dim=0)).view(B, 3)
        return (pos[:, None] > neg).all(dim=1).float().mean().item(), (pos[:, None] - neg).mean().item()

    accuracy, gap = ranking(joints, T_world_cpf, negatives)
    assert accuracy > 0.9 and gap > 0, (accuracy, gap)
    # Not memorised: motions and corruptions it never saw are ranked the same way.
    held_joints, held_T_world_cpf, _ = _walk(body, n=B, T=T, seed=12)
    held_stretched, _, _ = _walk(body, n=B, T=T, seed=12, shaped_scale=1.15)
    accuracy, gap = ranking(held_joints, held_T_world_cpf, _negatives(held_joints, held_stretched, seed=15))
    assert accuracy > 0.9 and gap > 0, (accuracy, gap)


def test_score_is_frozen_and_restores_the_mode(body):
    joints, T_world_cpf, _ = _walk(body, n=2, T=8, seed=4)
    trainer = PerceptualTrainer(TINY)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scores = trainer.score(joints, T_world_cpf)
    assert scores.shape == (2,) and not scores.requires_grad
    assert trainer.model.training  # a fresh module is in train mode; score() put it back
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert len(trainer.optimizer.state) == 0


# ----------------------------------------------------------------------------------- state round trip


def test_state_round_trip_through_safetensors_gives_a_bit_identical_next_step(body, tmp_path):
    joints, T_world_cpf, _ = _walk(body, n=3, T=12, seed=6)
    negatives = _negatives(joints, joints.flip(1), seed=7)
    a = PerceptualTrainer(TINY)
    for _ in range(2):
        a.train_step(joints, T_world_cpf, negatives)
    state = a.state_dict()
    save_file({**state.tensors, "policy.unrelated": torch.zeros(2)}, str(tmp_path / "shared.safetensors"))
    meta = json.loads(json.dumps(state.meta))  # must be JSON-able

    b = PerceptualTrainer(TINY)
    assert not torch.equal(a.score(joints, T_world_cpf), b.score(joints, T_world_cpf))
    b.load_state_dict(load_file(str(tmp_path / "shared.safetensors")), meta)
    assert b.num_steps == 2
    assert torch.equal(a.score(joints, T_world_cpf), b.score(joints, T_world_cpf))
    stats_a = a.train_step(joints, T_world_cpf, negatives)
    stats_b = b.train_step(joints, T_world_cpf, negatives)
    assert stats_a == stats_b
    for (name, p_a), p_b in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p_a, p_b), name
    # The snapshot is a copy: training after state_dict() did not change it.
    assert not torch.equal(state.tensors["perceptual.model.joint_embedding"], a.model.joint_embedding)


def test_load_rejects_a_different_config_and_a_foreign_format():
    state = PerceptualTrainer(TINY).state_dict()
    other = PerceptualTrainer(PerceptualConfig(width=32, num_heads=4, num_blocks=1, ff_dim=64))
    with pytest.raises(ValueError, match="num_blocks"):
        other.load_state_dict(state.tensors, state.meta)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict(state.tensors, {**state.meta, "format": "something-else"})


# ------------------------------------------------------------------------------------- validation


def test_config_validation():
    with pytest.raises(ValueError, match="2 \\* num_heads"):
        PerceptualConfig(width=36, num_heads=4)
    with pytest.raises(ValueError, match="temperature"):
        PerceptualConfig(temperature=0.0)
    with pytest.raises(ValueError, match="unknown PerceptualConfig keys"):
        PerceptualConfig.from_dict({"widht": 64})
    assert PerceptualConfig.from_dict(TINY.to_dict()) == TINY


@pytest.mark.unchecked_annotations
def test_shapes_are_validated_with_clear_errors():
    trainer = PerceptualTrainer(TINY)
    joints, T_world_cpf = torch.zeros(2, 8, 22, 3), _random_transforms(2, 8, seed=0)
    with pytest.raises(ValueError, match=r"\(N, T, 22, 3\) tensor"):
        trainer.score(torch.zeros(2, 8, 52, 3), T_world_cpf)
    with pytest.raises(ValueError, match="one pose more than the motion"):
        trainer.score(joints, T_world_cpf[:, 1:])
    with pytest.raises(ValueError, match="T >= 2"):
        trainer.score(joints[:, :1], T_world_cpf[:, :2])
    with pytest.raises(ValueError, match=r"expected \(B, M, T, J, 3\)"):
        trainer.train_step(joints, T_world_cpf, torch.zeros(2, 3, 7, 22, 3))
    with pytest.raises(ValueError, match="M = 0"):
        trainer.train_step(joints, T_world_cpf, torch.zeros(2, 0, 8, 22, 3))
    with pytest.raises(ValueError, match="cond has shape"):
        trainer.model(joints, T_world_cpf, torch.zeros(2, 8, 10))


def test_default_model_size_and_output_shape():
    trainer = PerceptualTrainer()
    assert trainer.model.num_parameters() == sum(p.numel() for p in trainer.model.parameters())
    scores = trainer.score(torch.randn(3, 5, 22, 3), _random_transforms(3, 5, seed=1))
    assert scores.shape == (3,) and bool(((scores > -1) & (scores < 1)).all())
