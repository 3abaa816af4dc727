"""The MotionGRPO paper's jitter (a ratio to the ground truth) and ground penetration (a sum over
frames of the lowest joint's depth), against hand-computed values and beside our definitions."""

from __future__ import annotations

import pytest
import torch

from tasks.ego_motion.evaluation.metrics import ground_penetration, ground_penetration_sum, jitter, jitter_ratio


def _cubic(coefficients: tuple[float, float, float], T: int = 8) -> torch.Tensor:
    """(1, T, 22, 3) joints moving as c * t^3 per axis (t in frames), each joint offset by a constant."""
    t = torch.arange(T, dtype=torch.float64)
    path = torch.stack([c * t**3 for c in coefficients], dim=-1)  # (T, 3)
    offsets = torch.linspace(0.0, 1.0, 22, dtype=torch.float64)[:, None]  # constant shifts: no jerk
    return (path[:, None, :] + offsets)[None].clone()


def test_jitter_ratio_by_hand():
    # The third difference of c t^3 is 6c per frame: gt (0, 0, 1/6) has jerk 1; pred (1/2, 2/3, 0)
    # has jerk |(3, 4, 0)| = 5 at every frame and joint, so the ratio is 5 whatever the frame rate.
    gt, pred = _cubic((0.0, 0.0, 1 / 6)), _cubic((0.5, 2 / 3, 0.0))
    assert jitter_ratio(pred, gt).tolist() == pytest.approx([5.0], rel=1e-9)
    assert jitter(pred, fps=30.0).item() == pytest.approx(5.0 * 30.0**3, rel=1e-9)  # ours: m/s^3 of pred alone
    assert jitter_ratio(gt, gt).tolist() == pytest.approx([1.0])


def test_jitter_ratio_refuses_a_ground_truth_without_jerk():
    gt = _cubic((0.0, 0.0, 0.0))  # static joints: no jerk, the ratio has no value
    with pytest.raises(ValueError, match="zero jerk"):
        jitter_ratio(_cubic((0.5, 0.0, 0.0)), gt)


def test_ground_penetration_sum_by_hand():
    joints = torch.full((1, 3, 22, 3), 0.5, dtype=torch.float64)
    joints[0, 0, 20, 2] = -0.02  # frame 0: a wrist 2 cm below the floor (not a foot joint)
    joints[0, 2, 7, 2] = -0.01  # frame 2: left ankle 1 cm and left toes 3 cm below
    joints[0, 2, 10, 2] = -0.03
    # The paper's: deepest joint per frame, summed: 0.02 + 0 + 0.03 m.
    assert ground_penetration_sum(joints).tolist() == pytest.approx([0.05])
    # Ours: mean depth of the 4 foot joints over 3 frames: (0.01 + 0.03) / 12 m; the wrist does not count.
    assert ground_penetration(joints).tolist() == pytest.approx([0.04 / 12])
    above = joints.clone()
    above[..., 2] = above[..., 2].abs()
    assert ground_penetration_sum(above).tolist() == [0.0]
