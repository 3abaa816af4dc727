"""The MuJoCo physics evaluator and rewards: properties that fail when the physics is wrong."""

from __future__ import annotations

import math

import mujoco
import numpy as np
import pytest
import torch

import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the physics_* rewards)
from diffgrpo.rewards import get_reward
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.body.geometry import axis_angle_to_matrix, make_transform
from tasks.ego_motion.physics.dynamics import (
    finite_difference_velocities,
    friction_cone_edges,
    inverse_dynamics,
    root_contact_basis,
)
from tasks.ego_motion.physics.evaluator import PHYSICS_METRIC_UNITS, PhysicsConfig, PhysicsEvaluator
from tasks.ego_motion.physics.humanoid import (
    DE_LEVA_MALE_MASS_PERCENT,
    HumanoidConfig,
    build_humanoid,
    segment_mass_fractions,
)
from tasks.ego_motion.physics.plausibility import plausibility
from tasks.ego_motion.physics.tracking import track

FPS = 30.0
T = 64


@pytest.fixture(scope="module")
def body():
    return load_body_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def humanoid(body):
    return build_humanoid(body.shaped_joints(torch.zeros(body.num_betas, dtype=torch.float64))[:22])


def _upright() -> torch.Tensor:
    """Model frame (+Y up) -> world (+Z up): +90 deg about x."""
    return axis_angle_to_matrix(torch.tensor([math.pi / 2, 0.0, 0.0], dtype=torch.float64))


def _standing(humanoid, frames: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    """The rest pose standing still with its lowest geom point on the floor: (T_world_root, body_rotmats)."""
    R = _upright()
    T_world_root = make_transform(R, torch.zeros(3, dtype=torch.float64)).expand(frames, 4, 4).clone()
    rotmats = torch.eye(3, dtype=torch.float64).expand(frames, 21, 3, 3).clone()
    lowest = humanoid.lowest_points(*humanoid.geom_poses(humanoid.qpos(T_world_root[:1], rotmats[:1])))
    T_world_root[:, 2, 3] -= float(lowest.min())
    return T_world_root, rotmats


def test_total_mass_and_segments_match_the_body_model(body):
    """Mass = the config's, split by de Leva's table; joints = SMPL-H forward kinematics for random poses and shapes."""
    assert sum(segment_mass_fractions()) == pytest.approx(1.0, abs=1e-12)
    assert sum(DE_LEVA_MALE_MASS_PERCENT[k] for k in ("head_neck", "upper_trunk", "middle_trunk", "lower_trunk")) + \
        2 * sum(DE_LEVA_MALE_MASS_PERCENT[k] for k in ("upper_arm", "forearm", "hand", "thigh", "shank", "foot")) \
        == pytest.approx(100.0, abs=1e-9)
    gen = torch.Generator().manual_seed(0)
    betas = torch.randn(body.num_betas, generator=gen, dtype=torch.float64)
    h = build_humanoid(body.shaped_joints(betas)[:22], HumanoidConfig(body_mass_kg=81.5))
    assert h.total_mass_kg == pytest.approx(81.5, rel=1e-9)
    rot = axis_angle_to_matrix(0.5 * torch.randn(5, 22, 3, generator=gen, dtype=torch.float64))
    T_world_root = make_transform(rot[:, 0], torch.randn(5, 3, generator=gen, dtype=torch.float64))
    expected = body.forward_kinematics(rot[:, 1:], betas=betas, T_world_root=T_world_root).t_world_joint[:, :22]
    qpos = h.qpos(T_world_root, rot[:, 1:])
    data = mujoco.MjData(h.model)
    for f in range(5):
        data.qpos[:] = qpos[f]
        mujoco.mj_kinematics(h.model, data)
        np.testing.assert_allclose(data.xpos[h.body_ids], expected[f].numpy(), atol=1e-9)
    # bone lengths: distance between consecutive joint bodies equals the shaped skeleton's
    J = body.shaped_joints(betas)[:22].numpy()
    np.testing.assert_allclose(np.linalg.norm(h.model.body_pos[h.body_ids[1:]], axis=-1),
                               np.linalg.norm(J[1:] - J[[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16,
                                                         17, 18, 19]], axis=-1), rtol=1e-9)


def test_finite_differences_are_exact_for_constant_acceleration(humanoid):
    """Central differences recover a quadratic pelvis trajectory's velocity and acceleration exactly."""
    t = np.arange(8) / FPS
    qpos = np.tile(humanoid.model.qpos0, (8, 1))
    qpos[:, 0] = 0.3 * t + 0.5 * 2.0 * t**2
    qvel, qacc = finite_difference_velocities(humanoid.model, qpos, FPS)
    np.testing.assert_allclose(qvel[1:-1, 0], 0.3 + 2.0 * t[1:-1], atol=1e-9)
    np.testing.assert_allclose(qacc[1:-1, 0], 2.0, atol=1e-7)


def test_floating_body_needs_its_weight_and_standing_needs_almost_none(humanoid):
    T_world_root, rotmats = _standing(humanoid)
    standing = inverse_dynamics(humanoid, humanoid.qpos(T_world_root, rotmats), FPS)
    assert standing.residual_force_n.max() < 0.02 * humanoid.weight_n
    assert standing.contact_force_n.mean() == pytest.approx(humanoid.weight_n, rel=0.02)
    lifted = T_world_root.clone()
    lifted[:, 2, 3] += 0.5
    floating = inverse_dynamics(humanoid, humanoid.qpos(lifted, rotmats), FPS)
    np.testing.assert_allclose(floating.residual_force_n, humanoid.weight_n, rtol=1e-6)
    assert floating.num_contacts.max() == 0


def _test_window(index: int = 12):
    from tasks.ego_motion.task import EgoMotionTask

    task = EgoMotionTask()
    return task.load_examples("test", torch.tensor([index]))


def test_ground_truth_clip_needs_far_less_residual_than_its_shuffled_frames(body):
    batch = _test_window()
    betas = torch.nn.functional.pad(batch["betas"][0].double(), (0, body.num_betas - 16))
    h = build_humanoid(body.shaped_joints(betas)[:22])
    qpos = h.qpos(batch["T_world_root"][0], batch["body_rotmats"][0])
    truth = inverse_dynamics(h, qpos, FPS).residual_force_n.mean()
    shuffled = inverse_dynamics(h, qpos[np.random.default_rng(0).permutation(len(qpos))], FPS).residual_force_n.mean()
    assert truth < 0.2 * h.weight_n
    assert shuffled > 10 * truth


def test_tracking_keeps_a_standing_body_up_and_loses_one_pitching_over(humanoid):
    T_world_root, rotmats = _standing(humanoid)
    still = track(humanoid, humanoid.qpos(T_world_root, rotmats), FPS)
    assert still.success and still.survival == 1.0 and still.tracking_error_m < 0.05
    # lean the whole body forward about its feet, 0 -> 70 degrees over the window
    angles = torch.linspace(0.0, 1.2, T, dtype=torch.float64)
    lean = axis_angle_to_matrix(torch.stack([angles, 0 * angles, 0 * angles], -1))
    pitched = T_world_root.clone()
    pitched[:, :3, :3] = lean @ T_world_root[:, :3, :3]
    pitched[:, :3, 3] = (lean @ T_world_root[:, :3, 3, None])[..., 0]
    fallen = track(humanoid, humanoid.qpos(pitched, rotmats), FPS)
    assert not fallen.success and fallen.survival < 0.9


def test_contact_reward_falls_monotonically_as_skating_is_injected(body, humanoid):
    T_world_root, rotmats = _standing(humanoid)
    evaluator = PhysicsEvaluator(body)
    reward = get_reward("physics_contact", evaluator=evaluator)
    values = []
    for speed in (0.0, 0.2, 0.5, 1.0, 2.0):  # m/s of sliding along +x while standing
        slid = T_world_root.clone()
        slid[:, 0, 3] += speed * torch.arange(T, dtype=torch.float64) / FPS
        decoded = {"T_world_root": slid[None], "body_rotmats": rotmats[None],
                   "betas": torch.zeros(1, 16, dtype=torch.float64)}
        values.append(float(reward(decoded, {})[0]))
    assert all(a > b for a, b in zip(values[:-1], values[1:], strict=True)), values
    skating = plausibility(humanoid, humanoid.qpos(T_world_root, rotmats)).skating_m
    assert skating == pytest.approx(0.0, abs=1e-9)


def test_physics_rewards_prefer_standing_to_floating_and_share_one_evaluation(body, humanoid):
    T_world_root, rotmats = _standing(humanoid)
    lifted = T_world_root.clone()
    lifted[:, 2, 3] += 0.3
    decoded = {"T_world_root": torch.stack([T_world_root, lifted]), "body_rotmats": torch.stack([rotmats, rotmats]),
               "betas": torch.zeros(2, 16, dtype=torch.float64)}
    evaluator = PhysicsEvaluator(body)
    measures = evaluator.evaluate(decoded)
    assert set(measures) == set(PHYSICS_METRIC_UNITS)
    assert evaluator.evaluate(decoded) is measures  # memoised: three rewards, one evaluation
    for name in ("physics_residual", "physics_tracking", "physics_contact"):
        r = get_reward(name, evaluator=evaluator)(decoded, {})
        assert r.shape == (2,) and r.dtype == torch.float32 and r[0] > r[1], (name, r)
    assert measures["floating_m"][1] == pytest.approx(0.3 - 0.005, abs=1e-6)


def test_physics_reward_rejects_bad_parameters():
    with pytest.raises(ValueError, match="mode"):
        get_reward("physics_tracking", mode="binary")
    with pytest.raises(ValueError, match="omega"):
        get_reward("physics_contact", omega=-1.0)


def test_planted_reward_is_exp_of_the_planted_foot_speed(body, humanoid):
    """physics_planted = exp(-omega v): 1 standing still, exp(-2) at 1 m/s of sliding, from the evaluator's
    planted-foot speed (the success criterion's measure); a NaN row scores 0."""
    T_world_root, rotmats = _standing(humanoid)
    slid = T_world_root.clone()
    slid[:, 0, 3] += 1.0 * torch.arange(T, dtype=torch.float64) / FPS
    broken = T_world_root.clone()
    broken[3, 0, 3] = float("nan")
    decoded = {"T_world_root": torch.stack([T_world_root, slid, broken]),
               "body_rotmats": torch.stack([rotmats] * 3), "betas": torch.zeros(3, 16, dtype=torch.float64)}
    evaluator = PhysicsEvaluator(body)
    speed = evaluator.evaluate(decoded)["tracking_planted_foot_speed_m_per_s"]
    assert float(speed[0]) == pytest.approx(0.0, abs=1e-6) and float(speed[1]) == pytest.approx(1.0, abs=1e-3)
    reward = get_reward("physics_planted", evaluator=evaluator)(decoded, {})
    assert reward.dtype == torch.float32
    assert reward.tolist() == pytest.approx([1.0, math.exp(-2.0), 0.0], abs=1e-3)
    with pytest.raises(ValueError, match="omega"):
        get_reward("physics_planted", omega=0.0)


def test_root_contact_basis_equals_mujocos_generalized_contact_force(humanoid):
    """For random poses, points and cone weights, the analytic root rows equal mj_applyFT's (forces and
    torques), so the residual's torque about the pelvis is MuJoCo's."""
    gen = np.random.default_rng(0)
    model, data = humanoid.model, mujoco.MjData(humanoid.model)
    edges = friction_cone_edges(1.0)
    for _ in range(5):
        data.qpos[:] = humanoid.model.qpos0
        data.qpos[:3] = gen.normal(size=3)
        quat = gen.normal(size=4)
        data.qpos[3:7] = quat / np.linalg.norm(quat)
        mujoco.mj_kinematics(model, data)
        mujoco.mj_comPos(model, data)
        bodies = gen.choice(humanoid.body_ids, size=3)
        points = data.xpos[bodies] + 0.1 * gen.normal(size=(3, 3))
        weights = gen.uniform(size=4 * 3)
        pelvis = humanoid.body_ids[0]
        basis = root_contact_basis(points, data.xpos[pelvis], data.xmat[pelvis].reshape(3, 3), edges)
        qfrc = np.zeros(model.nv)
        forces = weights.reshape(3, 4) @ edges.T  # (3 points, 3)
        for point, body, force in zip(points, bodies, forces, strict=True):
            mujoco.mj_applyFT(model, data, force, np.zeros(3), point, body, qfrc)
        np.testing.assert_allclose(basis @ weights, qfrc[:6], atol=1e-10)


def test_inverse_dynamics_kinematics_are_the_reference_and_geom_kinematics(humanoid):
    """``inverse_dynamics(..., kinematics=True)`` records the forward kinematics of its own ``mj_inverse`` calls for the
    plausibility and the tracker: bit for bit ``Humanoid.geom_poses`` and ``criterion.reference_kinematics``; the
    inverse dynamics itself is the same with or without them, and in reused data."""
    from tasks.ego_motion.physics.criterion import reference_kinematics

    T_world_root, rotmats = _standing(humanoid, 8)
    T_world_root[:, 0, 3] += torch.linspace(0.0, 0.2, 8, dtype=torch.float64)  # moving, so frames differ
    qpos = humanoid.qpos(T_world_root, rotmats)
    plain = inverse_dynamics(humanoid, qpos, 30.0)
    data = mujoco.MjData(humanoid.model)
    inverse_dynamics(humanoid, qpos[::-1].copy(), 30.0, data=data)  # another motion first
    recorded = inverse_dynamics(humanoid, qpos, 30.0, kinematics=True, data=data)
    assert plain.kinematics is None
    np.testing.assert_array_equal(recorded.residual_force_n, plain.residual_force_n)
    np.testing.assert_array_equal(recorded.residual_torque_nm, plain.residual_torque_nm)
    geom_xpos, geom_xmat = humanoid.geom_poses(qpos)
    joints, feet = reference_kinematics(humanoid, qpos)
    kinematics = recorded.kinematics
    for got, expected in ((kinematics.geom_xpos, geom_xpos), (kinematics.geom_xmat, geom_xmat),
                          (kinematics.joints, joints), (kinematics.foot_points, feet)):
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="humanoid.model"):
        inverse_dynamics(humanoid, qpos, 30.0, data=mujoco.MjData(humanoid.tracker_model))


def test_leaning_past_the_feet_needs_a_residual_torque(humanoid):
    T_world_root, rotmats = _standing(humanoid, frames=3)
    lean = axis_angle_to_matrix(torch.tensor([0.35, 0.1, 0.0], dtype=torch.float64))
    T_world_root[:, :3, :3] = lean @ T_world_root[:, :3, :3]
    T_world_root[:, :3, 3] = (lean @ T_world_root[:, :3, 3, None])[..., 0]
    qpos = humanoid.qpos(T_world_root, rotmats)
    qpos[:, 2] -= humanoid.foot_points(*humanoid.geom_poses(qpos))[..., 2].min()  # feet on the floor again
    leaning = inverse_dynamics(humanoid, qpos, FPS)
    upright = inverse_dynamics(humanoid, humanoid.qpos(*_standing(humanoid, frames=3)), FPS)
    assert leaning.num_contacts[1] > 0 and leaning.contact_force_n[1] > 0.5 * humanoid.weight_n
    assert leaning.residual_torque_nm[1] > 0.05 * humanoid.weight_n > 10 * upright.residual_torque_nm[1]


def test_tracking_holds_a_bent_pose_and_restores_the_shared_springs(humanoid):
    """A crouch held still is tracked closely (the springs follow the reference, not the rest pose),
    and the cached model's spring targets come back unchanged, even after an error."""
    T_world_root, rotmats = _standing(humanoid)
    bend = axis_angle_to_matrix(torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64))
    for joint in (16, 17):  # shoulders raised: a pose far from rest that needs no balance change
        rotmats[:, joint - 1] = axis_angle_to_matrix(torch.tensor([0.0, 0.0, 1.2 if joint == 16 else -1.2],
                                                                  dtype=torch.float64))
    rotmats[:, 18 - 1] = bend  # left elbow bent
    lowest = humanoid.lowest_points(*humanoid.geom_poses(humanoid.qpos(T_world_root[:1], rotmats[:1]))).min()
    T_world_root[:, 2, 3] -= float(lowest)
    springs = humanoid.tracker_model.qpos_spring.copy()
    held = track(humanoid, humanoid.qpos(T_world_root, rotmats), FPS)
    assert held.success and held.tracking_error_m < 0.03
    np.testing.assert_array_equal(humanoid.tracker_model.qpos_spring, springs)
    with pytest.raises(ValueError, match="whole steps"):
        track(humanoid, humanoid.qpos(T_world_root, rotmats), 25.0)
    np.testing.assert_array_equal(humanoid.tracker_model.qpos_spring, springs)


def test_finite_differences_recover_a_constant_rotation_rate(humanoid):
    """A ball joint turning at 1.5 rad/s about its local x has that angular velocity and no acceleration."""
    frames = 8
    t = torch.arange(frames, dtype=torch.float64) / FPS
    T_world_root, rotmats = _standing(humanoid, frames=frames)
    rotmats[:, 3] = axis_angle_to_matrix(torch.stack([1.5 * t, 0 * t, 0 * t], -1))  # joint 4 (left knee)
    qvel, qacc = finite_difference_velocities(humanoid.model, humanoid.qpos(T_world_root, rotmats), FPS)
    knee = humanoid.dof_adr[3]
    np.testing.assert_allclose(qvel[:, knee: knee + 3], np.tile([1.5, 0.0, 0.0], (frames, 1)), atol=1e-9)
    np.testing.assert_allclose(qacc[:, knee: knee + 3], 0.0, atol=1e-7)


def test_memoised_evaluation_is_redone_after_an_in_place_edit(body, humanoid):
    T_world_root, rotmats = _standing(humanoid, frames=8)
    decoded = {"T_world_root": T_world_root[None].clone(), "body_rotmats": rotmats[None],
               "betas": torch.zeros(1, 16, dtype=torch.float64)}
    evaluator = PhysicsEvaluator(body, PhysicsConfig(simulate=False))
    before = evaluator.evaluate(decoded)["floating_m"].item()
    decoded["T_world_root"][..., 2, 3] += 0.5
    after = evaluator.evaluate(decoded)["floating_m"].item()
    assert before == pytest.approx(0.0, abs=1e-9) and after == pytest.approx(0.495, abs=1e-6)
    with pytest.raises(ValueError, match="simulate=True"):
        get_reward("physics_tracking", evaluator=evaluator)


def test_a_refined_evaluation_scores_the_refined_motion_and_isolates_rows_it_refuses(body, humanoid, caplog):
    """``refine`` sees the finite rows only; what it returns is scored; a row it refuses is invalid, not a crash."""
    T_world_root, rotmats = _standing(humanoid, frames=12)
    decoded = {"T_world_root": torch.stack([T_world_root] * 3).clone(), "body_rotmats": torch.stack([rotmats] * 3),
               "betas": torch.zeros(3, 16, dtype=torch.float64)}
    decoded["body_rotmats"][1, 4, 0, 0, 0] = float("nan")  # row 1 cannot be scored at all
    seen = []

    def lift(rows):  # stands in for the test-time optimisation: lifts every row 0.3 m, refuses a row marked 9
        seen.append(len(rows["T_world_root"]))
        if (rows["marker"] == 9).any():
            raise ValueError("not a rotation")
        lifted = rows["T_world_root"].clone()
        lifted[..., 2, 3] += 0.3
        return {"T_world_root": lifted, "body_rotmats": rows["body_rotmats"]}

    evaluator = PhysicsEvaluator(body, PhysicsConfig(simulate=False), refine=lift)
    decoded["marker"] = torch.tensor([0, 0, 0])
    measures = evaluator.evaluate(decoded)
    assert seen == [2]  # rows 0 and 2, together; never row 1
    assert measures["floating_m"][[0, 2]].tolist() == pytest.approx([0.295, 0.295], abs=1e-6)
    assert measures["invalid"].tolist() == [0.0, 1.0, 0.0]
    assert decoded["T_world_root"][0, 0, 2, 3] == T_world_root[0, 2, 3]  # the caller's batch is not edited
    decoded = {**decoded, "marker": torch.tensor([0, 0, 9])}
    with caplog.at_level("WARNING"):
        measures = evaluator.evaluate(decoded)
    assert measures["invalid"].tolist() == [0.0, 1.0, 1.0]  # row 2 refused on its own, row 0 still refined
    assert measures["floating_m"][0].item() == pytest.approx(0.295, abs=1e-6)
    assert "row 2 cannot be refined" in caplog.text


def test_a_row_not_finite_in_another_tensor_is_not_refined_and_the_rest_are_refined_together(body, humanoid, caplog):
    """A row whose body is finite but whose other inputs to the refinement are not (e.g. NaN contacts, which the
    test-time optimisation refuses) is scored invalid without being refined; the other rows are still refined in one
    call, not row by row (the test-time optimisation's result for a row depends on its batch)."""
    T_world_root, rotmats = _standing(humanoid, frames=12)
    decoded = {"T_world_root": torch.stack([T_world_root] * 3), "body_rotmats": torch.stack([rotmats] * 3),
               "betas": torch.zeros(3, 16, dtype=torch.float64), "contacts": torch.zeros(3, 12, 21)}
    decoded["contacts"][1, 3, 7] = float("nan")
    seen = []

    def lift(rows):
        seen.append(len(rows["T_world_root"]))
        if not torch.isfinite(rows["contacts"]).all():
            raise ValueError("contacts contains NaN or infinite values")
        lifted = rows["T_world_root"].clone()
        lifted[..., 2, 3] += 0.3
        return {"T_world_root": lifted, "body_rotmats": rows["body_rotmats"]}

    evaluator = PhysicsEvaluator(body, PhysicsConfig(simulate=False), refine=lift)
    with caplog.at_level("WARNING"):
        measures = evaluator.evaluate(decoded)
    assert seen == [2]  # rows 0 and 2, in one call
    assert measures["invalid"].tolist() == [0.0, 1.0, 0.0]
    assert measures["floating_m"][[0, 2]].tolist() == pytest.approx([0.295, 0.295], abs=1e-6)
    assert "row 1 cannot be refined (decoded['contacts'][1] has NaN or inf)" in caplog.text
