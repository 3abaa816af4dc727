"""Ego-motion rewards against hand-computed cases: a perfect prediction, a pure offset, one rotated
joint, a constant drift, sinking and sliding feet, a fake critic; ordering, batching and input checks."""

from __future__ import annotations

import math

import pytest
import torch

from diffgrpo.rewards import RewardSet, get_reward
from tasks.ego_motion.body.geometry import FOOT_JOINTS, axis_angle_to_matrix, rotation_about_z
from tasks.ego_motion.rewards import registered as R
from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualTrainer

DTYPE = torch.float64
JOINT_REWARDS = ("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel")


def _motion(seed: int, n: int = 2, frames: int = 5) -> dict[str, torch.Tensor]:
    """A random but non-degenerate motion: joints (n, frames, 22, 3) m and rotations (n, frames, 21, 3, 3)."""
    gen = torch.Generator().manual_seed(seed)
    joints = torch.randn(n, frames, 22, 3, generator=gen, dtype=DTYPE) * 0.3
    joints[..., 2] += 1.0
    rotmats = axis_angle_to_matrix(torch.randn(n, frames, 21, 3, generator=gen, dtype=DTYPE) * 0.5)
    return {"joints_world": joints, "body_rotmats": rotmats}


def _with(sample: dict[str, torch.Tensor], **changes: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**sample, **changes}


@pytest.mark.parametrize("name", JOINT_REWARDS)
def test_perfect_prediction_scores_one(name: str) -> None:
    gt = _motion(0)
    out = get_reward(name)(dict(gt), gt)
    assert out.shape == (2,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(2), atol=1e-6, rtol=0)


def test_geodesic_rotation_also_scores_one_when_perfect() -> None:
    gt = _motion(1)
    torch.testing.assert_close(get_reward("ego_rot", error="geodesic")(dict(gt), gt), torch.ones(2), atol=1e-6, rtol=0)


def test_pure_offset() -> None:
    """Every joint shifted by d = (3, 4, 0) cm: |d|^2 = 0.0025 m^2; the shape and the velocities are exact."""
    gt = _motion(2)
    offset = torch.tensor([0.03, 0.04, 0.0], dtype=DTYPE)
    pred = _with(gt, joints_world=gt["joints_world"] + offset)
    expected = torch.full((2,), math.exp(-R.OMEGA_POS * 0.0025), dtype=torch.float32)
    torch.testing.assert_close(get_reward("ego_pos")(pred, gt), expected)
    torch.testing.assert_close(get_reward("ego_pos", omega=100.0)(pred, gt),
                               torch.full((2,), math.exp(-0.25), dtype=torch.float32))
    torch.testing.assert_close(get_reward("ego_pa_pos")(pred, gt), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(get_reward("ego_vel")(pred, gt), torch.ones(2), atol=1e-6, rtol=0)


def test_pa_pos_ignores_rotation_and_scale_but_pos_does_not() -> None:
    """Each frame rotated 30 deg about z, scaled by 1.2 and moved: the pose is right, the placement wrong."""
    gt = _motion(3)
    Rz = rotation_about_z(torch.tensor(math.radians(30.0), dtype=DTYPE))
    pred = _with(gt, joints_world=1.2 * gt["joints_world"] @ Rz.T + torch.tensor([0.5, -0.2, 0.1], dtype=DTYPE))
    torch.testing.assert_close(get_reward("ego_pa_pos")(pred, gt), torch.ones(2), atol=1e-5, rtol=0)
    assert bool((get_reward("ego_pos")(pred, gt) < 0.5).all())


def test_one_rotated_joint_gives_hand_computed_errors() -> None:
    """Joint 5 of frame 0 (identity in the truth) predicted as 90 deg about z (T = 2): Rz(90) - I
    has entries -1, -1, 1, -1 (L1 sum 4), so the mean over 2 frames x 21 joints x 9 entries is
    4 / 378; the geodesic mean is (pi / 2) / 42 rad."""
    gt = _motion(4, n=1, frames=2)
    gt["body_rotmats"][0, 0, 5] = torch.eye(3, dtype=DTYPE)  # entry-wise L1 depends on the base rotation
    rotmats = gt["body_rotmats"].clone()
    rotmats[0, 0, 5] = rotation_about_z(torch.tensor(math.pi / 2, dtype=DTYPE))
    pred = _with(gt, body_rotmats=rotmats)
    assert R.rotation_l1_error(rotmats, gt["body_rotmats"]).item() == pytest.approx(4 / 378, rel=1e-9)
    torch.testing.assert_close(get_reward("ego_rot", omega=2.0)(pred, gt),
                               torch.tensor([math.exp(-2.0 * 4 / 378)], dtype=torch.float32))
    torch.testing.assert_close(get_reward("ego_rot", error="geodesic", omega=2.0)(pred, gt),
                               torch.tensor([math.exp(-2.0 * (math.pi / 2) / 42)], dtype=torch.float32))


def test_rotation_l1_of_one_axis_rotation_per_entry() -> None:
    """Rz(theta) - I over 9 entries sums to 2 (1 - cos theta) + 2 sin theta; theta = 60 deg -> 2.7320508 / 9."""
    Rz = rotation_about_z(torch.tensor(math.radians(60.0), dtype=DTYPE)).expand(1, 1, 21, 3, 3)
    eye = torch.eye(3, dtype=DTYPE).expand(1, 1, 21, 3, 3)
    assert R.rotation_l1_error(Rz, eye).item() == pytest.approx((1.0 + math.sqrt(3.0)) / 9, rel=1e-9)


def test_constant_drift_has_hand_computed_velocity_error() -> None:
    """Prediction drifts by 1 cm per frame along x: at 30 fps every velocity is off by 0.3 m/s,
    so the velocity MSE is 0.09 (m/s)^2; at 10 fps 0.01 (m/s)^2."""
    gt = _motion(5, frames=6)
    drift = torch.arange(6, dtype=DTYPE)[None, :, None, None] * torch.tensor([0.01, 0.0, 0.0], dtype=DTYPE)
    pred = _with(gt, joints_world=gt["joints_world"] + drift)
    torch.testing.assert_close(get_reward("ego_vel", omega=1.0)(pred, gt),
                               torch.full((2,), math.exp(-0.09), dtype=torch.float32))
    torch.testing.assert_close(get_reward("ego_vel", omega=1.0, fps=10.0)(pred, gt),
                               torch.full((2,), math.exp(-0.01), dtype=torch.float32))


@pytest.mark.parametrize("name", [*JOINT_REWARDS, "ego_rot_geodesic"])
def test_bigger_error_gives_smaller_reward(name: str) -> None:
    """Scaling one fixed perturbation up (positions, or rotation angles about fixed axes) lowers the reward."""
    gt = _motion(6, n=1, frames=8)
    gen = torch.Generator().manual_seed(7)
    dx = torch.randn(1, 8, 22, 3, generator=gen, dtype=DTYPE) * 0.01
    axes = torch.randn(1, 8, 21, 3, generator=gen, dtype=DTYPE) * 0.2
    if name == "ego_rot_geodesic":
        reward = get_reward("ego_rot", error="geodesic")
    else:
        reward = get_reward(name)
    values = []
    for scale in (0.0, 0.5, 1.0, 2.0, 4.0):
        pred = _with(gt, joints_world=gt["joints_world"] + scale * dx,
                     body_rotmats=axis_angle_to_matrix(scale * axes) @ gt["body_rotmats"])
        values.append(reward(pred, gt).item())
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] > 0.0


def test_batch_rows_are_independent_and_float32() -> None:
    """N = 3 samples: row i is the reward of sample i alone; float64 inputs give float32 outputs."""
    gt = _motion(8, n=3)
    gen = torch.Generator().manual_seed(9)
    pred = _with(gt, joints_world=gt["joints_world"] + torch.randn(3, 5, 22, 3, generator=gen, dtype=DTYPE) * 0.1)
    for name in (*JOINT_REWARDS, "ego_physics"):
        reward = get_reward(name)
        out = reward(pred, gt)
        assert out.shape == (3,) and out.dtype == torch.float32
        for i in range(3):
            row = reward({k: v[i : i + 1] for k, v in pred.items()}, {k: v[i : i + 1] for k, v in gt.items()})
            torch.testing.assert_close(out[i : i + 1], row)


def test_rewards_do_not_track_gradients() -> None:
    gt = _motion(10)
    pred = {k: v.clone().requires_grad_(True) for k, v in gt.items()}
    for name in (*JOINT_REWARDS, "ego_physics"):
        assert not get_reward(name)(pred, gt).requires_grad


def test_rewards_combine_as_separate_sub_rewards() -> None:
    gt = _motion(11)
    out = RewardSet.from_specs({name: 1.0 for name in JOINT_REWARDS})(dict(gt), gt)
    assert sorted(out.components) == sorted(JOINT_REWARDS)
    torch.testing.assert_close(out.total, torch.full((2,), 4.0), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# Physics


def _standing(frames: int = 4, foot_z: float = 0.0) -> torch.Tensor:
    """(1, frames, 22, 3): body joints 1 m up, the 4 foot joints still at height foot_z."""
    joints = torch.zeros(1, frames, 22, 3, dtype=DTYPE)
    joints[..., 2] = 1.0
    joints[:, :, list(FOOT_JOINTS), 2] = foot_z
    return joints


def test_physics_feet_planted_on_the_floor_score_one() -> None:
    out = get_reward("ego_physics")({"joints_world": _standing()}, {})
    torch.testing.assert_close(out, torch.ones(1), atol=1e-7, rtol=0)


def test_physics_sinking_feet() -> None:
    """All feet 2 cm under the floor, still: GP = 0.02 m, no skating -> error 10 x 0.02 = 0.2."""
    out = get_reward("ego_physics")({"joints_world": _standing(foot_z=-0.02)}, {})
    torch.testing.assert_close(out, torch.tensor([math.exp(-R.OMEGA_PHYSICS * 0.2)], dtype=torch.float32))


def test_physics_sliding_toe() -> None:
    """One toe on the floor slides 1 cm per frame: 3 steps of weight 1 = 0.03 m in (4 - 1) / 30 = 0.1 s,
    a rate of 0.3 m/s -> error 0.3; twice the slide doubles the error."""
    joints = _standing(frames=4)
    joints[0, :, FOOT_JOINTS[2], 0] = torch.arange(4, dtype=DTYPE) * 0.01
    out = get_reward("ego_physics", omega=1.0)({"joints_world": joints}, {})
    torch.testing.assert_close(out, torch.tensor([math.exp(-0.3)], dtype=torch.float32))
    joints[0, :, FOOT_JOINTS[2], 0] *= 2.0
    out = get_reward("ego_physics", omega=1.0)({"joints_world": joints}, {})
    torch.testing.assert_close(out, torch.tensor([math.exp(-0.6)], dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# Visual


class _FakeScorer:
    """Returns fixed scores and records what it was called with."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores
        self.calls: list[tuple[torch.Size, torch.Size]] = []

    def score(self, joints: torch.Tensor, T_world_cpf: torch.Tensor) -> torch.Tensor:
        self.calls.append((joints.shape, T_world_cpf.shape))
        return self.scores


def _head(n: int, frames: int) -> torch.Tensor:
    return torch.eye(4, dtype=DTYPE).expand(n, frames + 1, 4, 4).clone()


def test_perceptual_reward_is_exp_of_omega_times_score() -> None:
    gt = _motion(12)
    scorer = _FakeScorer(torch.tensor([0.5, -0.25]))
    out = get_reward("ego_perceptual", scorer=scorer, omega=2.0)(dict(gt), {**gt, "T_world_cpf": _head(2, 5)})
    torch.testing.assert_close(out, torch.tensor([math.exp(1.0), math.exp(-0.5)], dtype=torch.float32))
    assert scorer.calls == [(torch.Size([2, 5, 22, 3]), torch.Size([2, 6, 4, 4]))]


def test_perceptual_reward_with_the_real_model() -> None:
    """A tiny untrained PerceptualTrainer: R_vis = exp(omega * trainer.score(...)) and stays in [e^-w, e^w]."""
    gt = _motion(13)
    head = _head(2, 5)
    head[..., :3, 3] = torch.tensor([0.0, 0.0, 1.6], dtype=DTYPE)
    trainer = PerceptualTrainer(PerceptualConfig(width=16, num_heads=2, num_blocks=1, ff_dim=16, seed=0))
    batch = {**gt, "T_world_cpf": head}
    out = get_reward("ego_perceptual", scorer=trainer)(dict(gt), batch)
    expected = torch.exp(R.OMEGA_PERCEPTUAL * trainer.score(gt["joints_world"].float(), head.float()))
    torch.testing.assert_close(out, expected.float())
    assert bool(((out >= math.exp(-R.OMEGA_PERCEPTUAL)) & (out <= math.exp(R.OMEGA_PERCEPTUAL))).all())


def test_perceptual_reward_rejects_bad_scorers_and_heads() -> None:
    gt = _motion(14)
    with pytest.raises(ValueError, match="score"):
        get_reward("ego_perceptual", scorer=object())
    wrong_rows = get_reward("ego_perceptual", scorer=_FakeScorer(torch.zeros(3)))
    with pytest.raises(ValueError, match=r"scorer.score returned \(3,\)"):
        wrong_rows(dict(gt), {**gt, "T_world_cpf": _head(2, 5)})
    reward = get_reward("ego_perceptual", scorer=_FakeScorer(torch.zeros(2)))
    with pytest.raises(ValueError, match=r"batch\['T_world_cpf'\].*\(N, T\+1, 4, 4\)"):
        reward(dict(gt), {**gt, "T_world_cpf": _head(2, 4)})  # T poses: the decoded head, not the window
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        out_of_range = get_reward("ego_perceptual", scorer=_FakeScorer(torch.tensor([3.0, 0.0])))
        out_of_range(dict(gt), {**gt, "T_world_cpf": _head(2, 5)})


# ----------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("name", JOINT_REWARDS)
def test_bad_shapes_name_the_key(name: str) -> None:
    gt = _motion(15)
    key = "body_rotmats" if name == "ego_rot" else "joints_world"
    reward = get_reward(name)
    with pytest.raises(ValueError, match=rf"decoded\['{key}'\] has shape"):
        reward(_with(gt, **{key: gt[key][:, :, :-1]}), gt)  # one joint short
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] has shape"):
        reward(dict(gt), _with(gt, **{key: gt[key][:1]}))  # ground truth not expanded to N
    with pytest.raises(KeyError, match=rf"decoded\['{key}'\] is missing"):
        reward({k: v for k, v in gt.items() if k != key}, gt)


def test_bad_parameters_raise() -> None:
    with pytest.raises(ValueError, match="omega"):
        get_reward("ego_pos", omega=0.0)
    with pytest.raises(ValueError, match="omega"):
        get_reward("ego_vel", omega=float("nan"))
    with pytest.raises(ValueError, match="fps"):
        get_reward("ego_vel", fps=-30.0)
    with pytest.raises(ValueError, match="'l1'"):
        get_reward("ego_rot", error="frobenius")
    with pytest.raises(ValueError, match="penetration_weight"):
        get_reward("ego_physics", penetration_weight=-1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        get_reward("ego_physics")({"joints_world": _standing(frames=1)}, {})
    gt = _motion(16, frames=1)
    with pytest.raises(ValueError, match="at least 2"):
        get_reward("ego_vel")(dict(gt), gt)
