"""Metrics against hand-computed cases: offsets, rotations, scales, reflections, constant and
cubic motion, penetrating, sliding and static feet, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.ego_motion.body.geometry import axis_angle_to_matrix, rotation_about_z
from tasks.ego_motion.evaluation.metrics import (
    FOOT_JOINTS,
    foot_skating,
    ground_penetration,
    head_orientation_error,
    head_position_error,
    jitter,
    mpjpe,
    mpjre,
    mpjve,
    pa_mpjpe,
    umeyama_similarity,
)

DTYPE = torch.float64
L_ANKLE, R_ANKLE, L_TOE, R_TOE = FOOT_JOINTS


def _random_joints(seed: int, batch: int = 2, frames: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 22, 3, generator=gen, dtype=DTYPE)


def _moving_joints(velocity_m_s: tuple[float, float, float], frames: int, fps: float) -> torch.Tensor:
    """(1, T, 22, 3): a fixed random pose translating at constant velocity."""
    pose = _random_joints(0, batch=1, frames=1)[0, 0]  # (22, 3)
    t_s = torch.arange(frames, dtype=DTYPE) / fps
    return (pose + t_s[:, None, None] * torch.tensor(velocity_m_s, dtype=DTYPE))[None]


# --- position errors ------------------------------------------------------------------------------


def test_translation_offset() -> None:
    gt = _random_joints(1)
    pred = gt + torch.tensor([0.03, 0.04, 0.0], dtype=DTYPE)  # 5 cm offset
    torch.testing.assert_close(mpjpe(pred, gt), torch.full((2,), 50.0, dtype=DTYPE))
    torch.testing.assert_close(pa_mpjpe(pred, gt), torch.zeros(2, dtype=DTYPE), atol=1e-9, rtol=0)


def test_rigid_rotation_and_scale_are_removed_by_procrustes() -> None:
    gt = _random_joints(2)
    R = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.9], dtype=DTYPE))
    pred = 1.7 * gt @ R.T + torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE)
    for direction in ("pred_to_gt", "gt_to_pred"):
        torch.testing.assert_close(
            pa_mpjpe(pred, gt, direction), torch.zeros(2, dtype=DTYPE), atol=1e-9, rtol=0
        )
    assert (mpjpe(pred, gt) > 100.0).all()


def test_known_scale() -> None:
    # Every joint 0.5 m from the origin; the prediction is the same pose scaled by 2.
    directions = _random_joints(3)
    gt = 0.5 * directions / directions.norm(dim=-1, keepdim=True)
    pred = 2.0 * gt
    torch.testing.assert_close(mpjpe(pred, gt), torch.full((2,), 500.0, dtype=DTYPE))
    torch.testing.assert_close(pa_mpjpe(pred, gt), torch.zeros(2, dtype=DTYPE), atol=1e-9, rtol=0)


def test_pa_direction_matters_for_anisotropic_error() -> None:
    # 5 copies of a plus sign, plus 2 joints at the origin (22 joints); the prediction stretches
    # x by 2. Aligning pred onto gt: s = trace(D) / var(pred) = (30/22) / (50/22) = 0.6, errors
    # 0.2 m (x arms, 10 joints) and 0.4 m (y arms, 10 joints) -> 6/22 m. Aligning gt onto pred:
    # s = (30/22) / (20/22) = 1.5, error 0.5 m on 20 joints -> 10/22 m.
    plus = torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]], dtype=DTYPE)
    gt = torch.cat([plus.repeat(5, 1), torch.zeros(2, 3, dtype=DTYPE)])  # (22, 3)
    pred = gt * torch.tensor([2.0, 1.0, 1.0], dtype=DTYPE)
    gt, pred = gt[None, None], pred[None, None]
    torch.testing.assert_close(pa_mpjpe(pred, gt), torch.tensor([6000.0 / 22], dtype=DTYPE))
    torch.testing.assert_close(pa_mpjpe(pred, gt, "gt_to_pred"), torch.tensor([10000.0 / 22], dtype=DTYPE))


def test_umeyama_never_returns_a_reflection() -> None:
    # Target = source mirrored in x. The best orthogonal map is the mirror itself; the det fix
    # flips the axis of least spread (z) instead: R = diag(-1, 1, -1), s = (8+2-0.5)/(8+2+0.5).
    # Errors: x arms 2(1-s), y arms (1-s), z arms 0.5(1+s) -> mean 26/63 m (hand-computed).
    source = torch.tensor(
        [[2.0, 0, 0], [-2.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 0.5], [0, 0, -0.5]], dtype=DTYPE
    )
    target = source * torch.tensor([-1.0, 1.0, 1.0], dtype=DTYPE)
    fit = umeyama_similarity(source, target)
    torch.testing.assert_close(fit.R, torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=DTYPE)))
    assert torch.det(fit.R).item() == pytest.approx(1.0)
    assert fit.scale.item() == pytest.approx(9.5 / 10.5)
    error = (fit.apply(source) - target).norm(dim=-1).mean()
    assert error.item() == pytest.approx(26.0 / 63.0)


def test_umeyama_recovers_a_similarity_with_batch_axes() -> None:
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(3, 4, 10, 3, generator=gen, dtype=DTYPE)
    R = axis_angle_to_matrix(torch.randn(3, 4, 3, generator=gen, dtype=DTYPE))
    scale = torch.rand(3, 4, generator=gen, dtype=DTYPE) + 0.5
    t = torch.randn(3, 4, 3, generator=gen, dtype=DTYPE)
    target = scale[..., None, None] * source @ R.transpose(-1, -2) + t[..., None, :]
    fit = umeyama_similarity(source, target)
    torch.testing.assert_close(fit.R, R)
    torch.testing.assert_close(fit.scale, scale)
    torch.testing.assert_close(fit.t, t)


def test_head_position_error() -> None:
    gt = torch.zeros(2, 5, 3, dtype=DTYPE)
    pred = gt + torch.tensor([0.0, 0.003, 0.004], dtype=DTYPE)
    torch.testing.assert_close(head_position_error(pred, gt), torch.full((2,), 5.0, dtype=DTYPE))


# --- velocity and rotation errors ------------------------------------------------------------------


def test_mpjve_constant_velocity() -> None:
    fps = 30.0
    gt = _moving_joints((1.0, 0.0, 0.0), frames=10, fps=fps)
    faster = _moving_joints((1.5, 0.0, 0.0), frames=10, fps=fps)
    torch.testing.assert_close(mpjve(gt, gt, fps), torch.zeros(1, dtype=DTYPE))
    torch.testing.assert_close(mpjve(faster, gt, fps), torch.tensor([500.0], dtype=DTYPE))
    # A constant offset does not change velocities.
    torch.testing.assert_close(mpjve(gt + 0.2, gt, fps), torch.zeros(1, dtype=DTYPE), atol=1e-9, rtol=0)


def _rotation_about_x(angle_rad: float) -> torch.Tensor:
    return axis_angle_to_matrix(torch.tensor([angle_rad, 0.0, 0.0], dtype=DTYPE))


def test_mpjre_known_angle() -> None:
    gen = torch.Generator().manual_seed(4)
    gt_R = axis_angle_to_matrix(torch.randn(2, 3, 21, 3, generator=gen, dtype=DTYPE))
    pred_R = gt_R.clone()
    pred_R[:, :, :11] = gt_R[:, :, :11] @ _rotation_about_x(
        math.radians(30.0)
    )  # 11 of 21 joints off by 30 deg
    torch.testing.assert_close(mpjre(pred_R, gt_R), torch.full((2,), 11 * 30.0 / 21, dtype=DTYPE))
    torch.testing.assert_close(mpjre(gt_R, gt_R), torch.zeros(2, dtype=DTYPE), atol=1e-6, rtol=0)


def test_known_rotation_of_the_whole_body() -> None:
    # The whole body turned by 30 deg about the vertical through the origin: each joint moves
    # by the chord 2 * r_xy * sin(15 deg), and Procrustes removes all of it.
    gt = _random_joints(6)
    pred = gt @ rotation_about_z(torch.tensor(math.radians(30.0), dtype=DTYPE)).T
    chord_mm = 2.0 * gt[..., :2].norm(dim=-1) * math.sin(math.radians(15.0)) * 1000.0
    torch.testing.assert_close(mpjpe(pred, gt), chord_mm.mean(dim=(1, 2)))
    torch.testing.assert_close(pa_mpjpe(pred, gt), torch.zeros(2, dtype=DTYPE), atol=1e-9, rtol=0)


def test_head_orientation_error() -> None:
    gen = torch.Generator().manual_seed(8)
    gt_R = axis_angle_to_matrix(torch.randn(2, 7, 3, generator=gen, dtype=DTYPE))
    pred_R = rotation_about_z(torch.tensor(math.radians(10.0), dtype=DTYPE)) @ gt_R
    torch.testing.assert_close(head_orientation_error(pred_R, gt_R), torch.full((2,), 10.0, dtype=DTYPE))


# --- plausibility ----------------------------------------------------------------------------------


def test_jitter_zero_for_constant_velocity_and_acceleration() -> None:
    fps = 30.0
    moving = _moving_joints((1.0, -2.0, 0.5), frames=8, fps=fps)
    torch.testing.assert_close(jitter(moving, fps), torch.zeros(1, dtype=DTYPE), atol=1e-7, rtol=0)
    t_s = torch.arange(8, dtype=DTYPE) / fps
    falling = moving.clone()
    falling[..., 2] -= 0.5 * 9.81 * t_s[None, :, None] ** 2
    torch.testing.assert_close(jitter(falling, fps), torch.zeros(1, dtype=DTYPE), atol=1e-6, rtol=0)


def test_jitter_of_cubic_motion() -> None:
    # x(t) = t^3 (t in s) has jerk 6 m/s^3; the third difference is exact for a cubic.
    fps = 30.0
    t_s = torch.arange(9, dtype=DTYPE) / fps
    joints = _moving_joints((0.0, 0.0, 0.0), frames=9, fps=fps).clone()
    joints[..., 0] += t_s[None, :, None] ** 3
    torch.testing.assert_close(jitter(joints, fps), torch.tensor([6.0], dtype=DTYPE))


def _feet_test_body(frames: int) -> torch.Tensor:
    """(1, T, 22, 3): every joint static at 1 m height; tests then move the foot joints."""
    joints = torch.zeros(1, frames, 22, 3, dtype=DTYPE)
    joints[..., 2] = 1.0
    return joints


def test_ground_penetration() -> None:
    joints = _feet_test_body(frames=4)
    joints[:, :, list(FOOT_JOINTS), 2] = 0.1
    joints[:, 0:2, L_ANKLE, 2] = -0.02  # 2 cm below the floor in 2 frames
    joints[:, 3, R_TOE, 2] = -0.01  # 1 cm below in 1 frame
    joints[:, :, 20, 2] = -0.5  # a wrist below the floor is not a foot: ignored
    # (2 * 0.02 + 0.01) / (4 frames * 4 foot joints)
    torch.testing.assert_close(ground_penetration(joints), torch.tensor([0.05 / 16], dtype=DTYPE))
    joints[:, :, list(FOOT_JOINTS), 2] = 0.0  # standing exactly on the floor
    torch.testing.assert_close(ground_penetration(joints), torch.zeros(1, dtype=DTYPE))


def test_foot_skating_sliding_foot_at_known_height() -> None:
    frames = 5
    joints = _feet_test_body(frames)
    joints[:, :, list(FOOT_JOINTS), 2] = torch.tensor([0.04, 0.0, 0.05, 0.3], dtype=DTYPE)
    # Left ankle slides 3 cm in x and 4 cm in y per frame at z = 0.04 (H = 0.08): weight
    # 2 - 2^0.5. Left toe slides too, but at 5 cm, above its H = 4 cm: weight 0. The right
    # ankle on the floor (z = 0) is static and defines the floor.
    step = torch.arange(frames, dtype=DTYPE)
    for j in (L_ANKLE, L_TOE):
        joints[0, :, j, 0] = 0.03 * step
        joints[0, :, j, 1] = 0.04 * step
    expected = (frames - 1) * 0.07 * (2.0 - math.sqrt(2.0))
    torch.testing.assert_close(foot_skating(joints), torch.tensor([expected], dtype=DTYPE))
    # Lifting the whole body does not matter: the lowest foot joint is moved to the floor first.
    torch.testing.assert_close(foot_skating(joints + torch.tensor([0.0, 0.0, 0.2], dtype=DTYPE)),
                               torch.tensor([expected], dtype=DTYPE))  # fmt: skip


def test_foot_skating_on_the_floor_has_weight_one() -> None:
    joints = _feet_test_body(frames=3)
    joints[:, :, list(FOOT_JOINTS), 2] = 0.0
    joints[0, :, R_TOE, 0] = torch.tensor([0.0, 0.1, 0.3], dtype=DTYPE)  # 0.1 then 0.2 m
    torch.testing.assert_close(foot_skating(joints), torch.tensor([0.3], dtype=DTYPE))


def test_static_feet_do_not_skate() -> None:
    joints = _feet_test_body(frames=6)
    joints[:, :, list(FOOT_JOINTS), 2] = 0.0
    joints[:, :, 0, 0] = torch.linspace(0.0, 1.0, 6, dtype=DTYPE)  # the pelvis moves; feet do not
    torch.testing.assert_close(foot_skating(joints), torch.zeros(1, dtype=DTYPE))


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.unchecked_annotations
def test_rejects_bad_inputs() -> None:
    gt = _random_joints(9)
    with pytest.raises(ValueError, match=r"\(B, T, 22, 3\)"):
        mpjpe(gt[0], gt[0])
    with pytest.raises(ValueError, match=r"\(B, T, 22, 3\)"):
        mpjpe(torch.zeros(2, 6, 52, 3, dtype=DTYPE), torch.zeros(2, 6, 52, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="expand the ground truth"):
        mpjpe(gt, gt[:1])
    bad = gt.clone()
    bad[0, 2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pa_mpjpe(bad, gt)
    with pytest.raises(ValueError, match="direction"):
        pa_mpjpe(gt, gt, direction="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fps"):
        mpjve(gt, gt, fps=0.0)
    with pytest.raises(ValueError, match="at least 4"):
        jitter(gt[:, :3], fps=30.0)
    with pytest.raises(ValueError, match=r"\(B, T, 21, 3, 3\)"):
        mpjre(torch.eye(3).expand(1, 2, 22, 3, 3), torch.eye(3).expand(1, 2, 22, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, T, 3\)"):
        head_position_error(gt[:, :, 15:16], gt[:, :, 15:16])
