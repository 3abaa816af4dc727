"""Test-time optimisation: it keeps smooth motions, stops planted feet sliding, removes jitter, keeps
the head on the headset, returns rotations, and behaves (no_grad callers, determinism, batching,
bad input)."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.ego_motion.body.body_model import BodyModel, load_body_model
from tasks.ego_motion.body.geometry import (
    FOOT_JOINTS,
    HEAD_JOINT,
    axis_angle_to_matrix,
    geodesic_angle,
    invert_transform,
    make_transform,
    rotation_about_z,
)
from tasks.ego_motion.evaluation.metrics import foot_skating, jitter, mpjpe
from tasks.ego_motion.sampling.tto import FOOT_CONTACT_INDICES, LOSS_TERMS, TTOConfig, optimize_motion

FPS = 30.0
T = 36
LEFT_HIP = 0  # index among the 21 body joints (SMPL-H joint 1)


@pytest.fixture(scope="module")
def body() -> BodyModel:
    return load_body_model()


def _smooth_rotations(batch: int, frames: int, seed: int, amplitude_rad: float = 0.25) -> torch.Tensor:
    """(B, T, 21, 3, 3): every joint swings about a random axis at 0.5-1.2 Hz, a gait-like motion."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(batch, 1, 21, 3, generator=g), dim=-1)
    amp = amplitude_rad * torch.rand(batch, 1, 21, 1, generator=g)
    freq_hz = 0.5 + 0.7 * torch.rand(batch, 1, 21, 1, generator=g)
    phase = 2 * math.pi * torch.rand(batch, 1, 21, 1, generator=g)
    t_s = (torch.arange(frames, dtype=torch.float32) / FPS)[None, :, None, None]
    return axis_angle_to_matrix(axis * amp * torch.sin(2 * math.pi * freq_hz * t_s + phase))


def _walking_root(batch: int, frames: int, speed_mps: float = 1.2, yaw_rate_rad_s: float = 0.3) -> torch.Tensor:
    """(B, T, 4, 4): upright pelvis (model +Y -> world +Z) walking along a gentle curve, 0.93 m up."""
    t_s = torch.arange(frames, dtype=torch.float32) / FPS
    yaw = yaw_rate_rad_s * t_s  # rad
    R_world_model = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # +Y up -> +Z up
    R = rotation_about_z(yaw) @ R_world_model  # (T, 3, 3)
    xy = torch.stack([speed_mps * torch.cumsum(torch.cos(yaw), 0), speed_mps * torch.cumsum(torch.sin(yaw), 0)], -1)
    t = torch.cat([xy / FPS, torch.full((frames, 1), 0.93)], -1)
    return make_transform(R, t).expand(batch, frames, 4, 4)


def _head_poses(body: BodyModel, T_world_root: torch.Tensor, rotmats: torch.Tensor, betas: torch.Tensor):
    """(B, T, 4, 4) CPF poses of the motion, as the headset would report them."""
    return body.T_world_cpf_from_root(T_world_root, rotmats, betas[:, None])


def _joints(body: BodyModel, T_world_cpf: torch.Tensor, rotmats: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """(B, T, 22, 3) world joints with the root recovered from the head, like TTO does."""
    b = betas[:, None]
    T_world_root = body.root_from_cpf(T_world_cpf, rotmats, b)
    return body.forward_kinematics(rotmats, betas=b, T_world_root=T_world_root).t_world_joint[..., :22, :]


@pytest.fixture(scope="module")
def smooth_case(body):
    """A batch of 2 smooth walking motions with zero contacts and its TTO result."""
    B = 2
    rotmats = _smooth_rotations(B, T, seed=0)
    betas = 0.5 * torch.randn(B, 16, generator=torch.Generator().manual_seed(1))
    T_world_cpf = _head_poses(body, _walking_root(B, T), rotmats, betas)
    contacts = torch.zeros(B, T, 21)
    result = optimize_motion(body, T_world_cpf, betas, rotmats, contacts)
    return rotmats, betas, T_world_cpf, contacts, result


def test_smooth_motion_without_contacts_barely_changes(body, smooth_case):
    rotmats, betas, T_world_cpf, _, result = smooth_case
    angle_deg = torch.rad2deg(geodesic_angle(rotmats, result.body_rotmats))  # (B, T, 21)
    assert angle_deg.mean() < 0.5, angle_deg.mean()
    assert angle_deg.max() < 3.0, angle_deg.max()
    moved_mm = mpjpe(result.joints_world, _joints(body, T_world_cpf, rotmats, betas))
    assert (moved_mm < 10.0).all(), moved_mm
    assert torch.equal(result.initial_losses["foot_skating"], torch.zeros(2))


def test_objective_decreases_and_reports_every_term(smooth_case):
    *_, result = smooth_case
    assert set(result.initial_losses) == set(LOSS_TERMS) == set(result.final_losses)
    assert (result.final_objective < result.initial_objective).all()
    # At the sample the fidelity terms are exactly zero; only smoothness costs something.
    for name in ("rotation_prior", "torso_position_prior", "position_smoothness"):
        assert torch.allclose(result.initial_losses[name], torch.zeros(2), atol=1e-10), name
    weighted = sum(w * result.final_losses[k] for k, w in TTOConfig().weights().items())
    torch.testing.assert_close(weighted, result.final_objective)


def test_head_stays_on_the_headset_and_rotations_are_valid(body, smooth_case):
    _, betas, T_world_cpf, _, result = smooth_case
    T_world_head = T_world_cpf @ invert_transform(body.T_head_cpf(betas[:, None]))
    head_err_m = (result.joints_world[:, :, HEAD_JOINT] - T_world_head[..., :3, 3]).norm(dim=-1)
    assert head_err_m.max() < 1e-4, head_err_m.max()
    R = result.body_rotmats
    eye = torch.eye(3).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2]), atol=1e-5, rtol=0)
    root = body.root_from_cpf(T_world_cpf, R, betas[:, None])
    torch.testing.assert_close(result.T_world_root, root, atol=1e-5, rtol=0)


def test_planted_sliding_foot_stops_skating(body):
    """Standing still, the left hip swings so the left foot slides along the floor while the contact
    probability of both feet is 1: TTO must pin the foot and leave the head where it was."""
    B, frames = 1, 30
    t_s = torch.arange(frames, dtype=torch.float32) / FPS
    aa = torch.zeros(B, frames, 21, 3)
    aa[:, :, LEFT_HIP, 0] = 0.15 * torch.sin(2 * math.pi * 1.0 * t_s)  # 8.6 deg swing, 1 Hz
    rotmats = axis_angle_to_matrix(aa)
    betas = torch.zeros(B, 16)
    T_world_root = _walking_root(B, frames, speed_mps=0.0, yaw_rate_rad_s=0.0)
    T_world_cpf = _head_poses(body, T_world_root, rotmats, betas)
    contacts = torch.zeros(B, frames, 21)
    contacts[..., list(FOOT_CONTACT_INDICES)] = 1.0
    before = _joints(body, T_world_cpf, rotmats, betas)
    result = optimize_motion(body, T_world_cpf, betas, rotmats, contacts)
    fs_before, fs_after = foot_skating(before), foot_skating(result.joints_world)
    assert fs_before > 0.1, fs_before  # the input really skates (metres summed over the clip)
    # The metric is L1 and height-weighted, the TTO term squared: measured 0.89 -> 0.46 m (term -81 %).
    assert fs_after < 0.6 * fs_before, (fs_before, fs_after)
    assert result.final_losses["foot_skating"] < 0.3 * result.initial_losses["foot_skating"]

    # Least squares spreads the fix: the pelvis and spine lean a little, so the still right foot now
    # travels a few cm (measured 6 cm) while the left one's 50 cm of sliding drops to ~20 cm.
    def travel_m(joints: torch.Tensor, feet: list[int]) -> torch.Tensor:  # (B, len(feet)) metres
        return joints[:, :, feet, :2].diff(dim=1).norm(dim=-1).sum(dim=1)

    left, right = list(FOOT_JOINTS[0::2]), list(FOOT_JOINTS[1::2])
    assert (travel_m(result.joints_world, left) < 0.5 * travel_m(before, left)).all()
    assert (travel_m(result.joints_world, right) < 0.1).all()
    assert (mpjpe(result.joints_world, before) < 20.0).all()


def test_jittery_motion_gets_smoother_and_stays_close(body, smooth_case):
    rotmats, betas, T_world_cpf, contacts, _ = smooth_case
    g = torch.Generator().manual_seed(5)
    noisy = rotmats @ axis_angle_to_matrix(0.02 * torch.randn(*rotmats.shape[:3], 3, generator=g))
    # The head poses stay those of the clean motion: the headset does not see the body's jitter.
    clean_joints = _joints(body, T_world_cpf, rotmats, betas)
    noisy_joints = _joints(body, T_world_cpf, noisy, betas)
    result = optimize_motion(body, T_world_cpf, betas, noisy, contacts)
    jitter_clean, jitter_noisy, jitter_tto = (jitter(j, FPS) for j in (clean_joints, noisy_joints, result.joints_world))
    assert (jitter_tto < 0.6 * jitter_noisy).all(), (jitter_noisy, jitter_tto, jitter_clean)
    err_noisy, err_tto = mpjpe(noisy_joints, clean_joints), mpjpe(result.joints_world, clean_joints)
    assert (err_tto < err_noisy).all(), (err_noisy, err_tto)
    angle_noisy = geodesic_angle(rotmats, noisy).mean()
    assert geodesic_angle(rotmats, result.body_rotmats).mean() < angle_noisy


def test_no_grad_caller_frame_alignment_and_determinism(body, smooth_case):
    rotmats, betas, T_world_cpf, contacts, result = smooth_case
    cfg = TTOConfig(num_iterations=10)
    # T+1 head poses: the first only conditions frame 0 and is dropped.
    T_world_cpf_window = torch.cat([T_world_cpf[:, :1], T_world_cpf], dim=1)
    per_frame_betas = betas[:, None].expand(-1, T, -1)
    with torch.no_grad():
        a = optimize_motion(body, T_world_cpf_window, per_frame_betas, rotmats, contacts, cfg)
    b = optimize_motion(body, T_world_cpf, betas, rotmats, contacts, cfg)
    assert not a.body_rotmats.requires_grad and not a.joints_world.requires_grad
    torch.testing.assert_close(a.body_rotmats, b.body_rotmats, atol=1e-5, rtol=0)  # betas mean rounds
    again = optimize_motion(body, T_world_cpf, betas, rotmats, contacts, cfg)
    assert torch.equal(again.body_rotmats, b.body_rotmats)  # deterministic
    zero = optimize_motion(body, T_world_cpf, betas, rotmats, contacts, TTOConfig(num_iterations=0))
    assert torch.allclose(zero.body_rotmats, rotmats, atol=1e-6)


def test_adam_option_descends_and_is_batch_independent(body, smooth_case):
    rotmats, betas, T_world_cpf, contacts, _ = smooth_case
    noisy = rotmats @ axis_angle_to_matrix(0.02 * torch.randn(*rotmats.shape[:3], 3, generator=torch.Generator()))
    cfg = TTOConfig(optimizer="adam", num_iterations=15, learning_rate=0.01)
    batch = optimize_motion(body, T_world_cpf, betas, noisy, contacts, cfg)
    assert (batch.final_objective < batch.initial_objective).all()
    # Adam treats every sequence on its own: the first sequence alone gives the same answer.
    single = optimize_motion(body, T_world_cpf[:1], betas[:1], noisy[:1], contacts[:1], cfg)
    torch.testing.assert_close(single.body_rotmats, batch.body_rotmats[:1], atol=1e-5, rtol=0)


def test_per_sequence_lbfgs_is_batch_independent_where_batched_lbfgs_is_not(body, smooth_case):
    rotmats, betas, T_world_cpf, contacts, _ = smooth_case
    noisy = rotmats @ axis_angle_to_matrix(0.05 * torch.randn(*rotmats.shape[:3], 3, generator=torch.Generator()))
    results = {}
    for optimizer in ("lbfgs", "lbfgs_per_sequence"):
        cfg = TTOConfig(optimizer=optimizer, num_iterations=10)
        batch = optimize_motion(body, T_world_cpf, betas, noisy, contacts, cfg)
        single = optimize_motion(body, T_world_cpf[:1], betas[:1], noisy[:1], contacts[:1], cfg)
        assert (batch.final_objective < batch.initial_objective).all()
        results[optimizer] = (single.joints_world - batch.joints_world[:1]).abs().max().item()
    # the first sequence alone: the same optimisation, up to float32 rounding of batched and single kinematics (m)
    assert results["lbfgs_per_sequence"] < 1e-4
    assert results["lbfgs"] > 1e-3  # batched: its batch mate moves its joints by millimetres (16 mm here)


@pytest.mark.unchecked_annotations
def test_bad_inputs_are_rejected_with_a_fix(body, smooth_case):
    rotmats, betas, T_world_cpf, contacts, _ = smooth_case
    with pytest.raises(ValueError, match="T\\+1"):
        optimize_motion(body, T_world_cpf[:, :-3], betas, rotmats, contacts)
    with pytest.raises(ValueError, match="project_to_so3"):
        optimize_motion(body, T_world_cpf, betas, 1.1 * rotmats, contacts)
    with pytest.raises(ValueError, match="contacts"):
        optimize_motion(body, T_world_cpf, betas, rotmats, contacts[..., :4])
    with pytest.raises(ValueError, match="switch a term off"):
        TTOConfig(foot_skating_weight=-1.0)
