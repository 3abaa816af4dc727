"""The centroidal quantities of the balance feedback (physics/centroidal.py, balance.py): equal to MuJoCo's own and to
sums over the bodies worked out here."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from tasks.ego_motion.physics.balance import BalanceController, CentroidalTarget
from tasks.ego_motion.physics.centroidal import centroidal_momentum, com_rotational_inertia, root_to_com_wrench
from tasks.ego_motion.physics.dynamics import friction_cone_edges, root_contact_basis
from tasks.ego_motion.physics.tracking import TrackingConfig, reference_centroidal_state
from tests.ego_motion import test_physics as physics_tests

body, humanoid = physics_tests.body, physics_tests.humanoid  # the shared module-scoped fixtures


def _moving(humanoid, seed: int) -> tuple[mujoco.MjData, np.ndarray, np.ndarray, np.ndarray]:
    """A random pose and velocity after ``mj_step1``; (data, M (nv, nv), pelvis position (3,), R_world_pelvis)."""
    model = humanoid.tracker_model
    rng = np.random.default_rng(seed)
    data = mujoco.MjData(model)
    data.qpos[:] = humanoid.qpos(*physics_tests._standing(humanoid, 1))[0]
    mujoco.mj_integratePos(model, data.qpos, 0.3 * rng.normal(size=model.nv), 1.0)  # a random pose near standing
    data.qvel[:] = rng.normal(size=model.nv)
    mujoco.mj_step1(model, data)
    M = np.empty((model.nv, model.nv))
    mujoco.mj_fullM(model, data, M)
    pelvis = humanoid.body_ids[0]
    return data, M, data.xpos[pelvis].copy(), data.xmat[pelvis].reshape(3, 3).copy()


@pytest.mark.parametrize("seed", [0, 1])
def test_momentum_from_the_root_rows_equals_mujocos_and_a_sum_over_bodies(humanoid, seed):
    """m c_dot and L_G from (M qvel)[:6] equal MuJoCo's subtree momenta of the world body, and the sum over bodies
    of m_i v_i and (x_i - c) x m_i v_i + R_i I_i R_i^T w_i (each body's centre-of-mass velocity and angular velocity
    from ``mj_objectVelocity``)."""
    model = humanoid.tracker_model
    data, M, p, R = _moving(humanoid, seed)
    c = data.subtree_com[0].copy()
    linear, angular = centroidal_momentum(M[:6] @ data.qvel, c, p, R)
    mujoco.mj_subtreeVel(model, data)
    mass = model.body_subtreemass[0]
    np.testing.assert_allclose(linear, mass * data.subtree_linvel[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(angular, data.subtree_angmom[0], rtol=1e-9, atol=1e-9)
    by_hand_linear, by_hand_angular, velocity = np.zeros(3), np.zeros(3), np.empty(6)
    for b in range(1, model.nbody):
        mujoco.mj_objectVelocity(model, data, mujoco.mjtObj.mjOBJ_XBODY, b, velocity, 0)  # world (angular, linear)
        R_b = data.ximat[b].reshape(3, 3)
        v_com = velocity[3:] + np.cross(velocity[:3], data.xipos[b] - data.xpos[b])
        by_hand_linear += model.body_mass[b] * v_com
        by_hand_angular += (np.cross(data.xipos[b] - c, model.body_mass[b] * v_com)
                            + R_b @ (model.body_inertia[b] * (R_b.T @ velocity[:3])))
    np.testing.assert_allclose(linear, by_hand_linear, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(angular, by_hand_angular, rtol=1e-9, atol=1e-9)


def test_rotational_inertia_about_the_com_is_the_sum_over_bodies(humanoid):
    """I_G from the root's block of M equals sum_i R_i I_i R_i^T + m_i (|r_i|^2 1 - r_i r_i^T), r_i = x_i - c."""
    model = humanoid.tracker_model
    data, M, p, R = _moving(humanoid, 2)
    c = data.subtree_com[0]
    inertia = com_rotational_inertia(M[:6, :6], humanoid.total_mass_kg, c, p, R)
    by_hand = np.zeros((3, 3))
    for b in range(1, model.nbody):
        R_b, r = data.ximat[b].reshape(3, 3), data.xipos[b] - c
        by_hand += R_b @ np.diag(model.body_inertia[b]) @ R_b.T + model.body_mass[b] * (r @ r * np.eye(3)
                                                                                         - np.outer(r, r))
    np.testing.assert_allclose(inertia, by_hand, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="mass_kg"):
        com_rotational_inertia(M[:6, :6], 0.0, c, p, R)


def test_root_wrench_moves_to_the_com(humanoid):
    """A unit force along a cone edge at a sole corner, as the root's generalized force (``root_contact_basis``),
    moved by X to the centre of mass is the force and its moment (p_k - c) x f about c; X^-1 as the docstring gives
    it undoes X."""
    data, _, p, R = _moving(humanoid, 3)
    c = data.subtree_com[0]
    points = data.site_xpos[humanoid.foot_site_ids[:2]]
    edges = friction_cone_edges(0.8)
    X = root_to_com_wrench(c, p, R)
    moved = X @ root_contact_basis(points, p, R, edges)  # (6, 2 x 4)
    for k, point in enumerate(points):
        for e in range(4):
            f = edges[:, e]
            np.testing.assert_allclose(moved[:, 4 * k + e], np.concatenate([f, np.cross(point - c, f)]), atol=1e-12)
    wrench = np.random.default_rng(0).normal(size=6)
    back = np.concatenate([wrench[:3], R.T @ (wrench[3:] + np.cross(c - p, wrench[:3]))])
    np.testing.assert_allclose(X @ back, wrench, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        root_to_com_wrench(c, p, R[:2])


def test_centroidal_feedback_is_the_pd_and_zero_on_target(humanoid):
    """On target (the simulated centre of mass, its velocity and angular momentum, no orientation error) the feedback
    is zero; a centre of mass target 1 cm higher and 0.1 m/s faster asks for m (Kp 0.01 + Kd 0.1) more force
    through the CoM (no torque about it); a reference angular momentum 1 kg m^2/s above asks for k_L of torque."""
    cfg = TrackingConfig(balance_target="centre_of_mass")
    data, M, p, R = _moving(humanoid, 4)
    c = data.subtree_com[0].copy()
    linear, angular = centroidal_momentum(M[:6] @ data.qvel, c, p, R)
    controller = BalanceController(humanoid, cfg)
    controller(data, np.zeros(humanoid.tracker_model.nv))  # binds data and fills the controller's M
    mass = humanoid.total_mass_kg
    on_target = CentroidalTarget(c, linear / mass, angular, np.zeros(3))
    feedback, X = controller.centroidal_feedback(data, on_target)
    np.testing.assert_allclose(feedback, 0.0, atol=1e-9)
    up = np.array([0.0, 0.0, 1.0])
    omega = 2 * np.pi * cfg.com_frequency_hz
    kp, kd = omega**2, 2 * cfg.com_damping_ratio * omega
    off = CentroidalTarget(c + 0.01 * up, linear / mass + 0.1 * up, angular + up, np.zeros(3))
    feedback, X = controller.centroidal_feedback(data, off)
    np.testing.assert_allclose(X @ feedback, np.concatenate([mass * (kp * 0.01 + kd * 0.1) * up,
                                                             cfg.angular_momentum_gain_per_s * up]), atol=1e-9)


def test_reference_centroidal_state_of_a_still_pose_is_its_com_at_rest(humanoid):
    """A pose held still: the centre of mass is MuJoCo's (``mj_forward``) at every frame, its velocity and angular
    momentum zero."""
    model = humanoid.tracker_model
    qpos = humanoid.qpos(*physics_tests._standing(humanoid, 3))
    c, c_dot, L = reference_centroidal_state(model, qpos, np.zeros((3, model.nv)))
    data = mujoco.MjData(model)
    data.qpos[:] = qpos[0]
    mujoco.mj_forward(model, data)
    np.testing.assert_allclose(c, np.tile(data.subtree_com[0], (3, 1)), atol=1e-12)
    assert np.all(c_dot == 0) and np.all(L == 0)


def test_tracking_config_refuses_an_unknown_balance_target():
    with pytest.raises(ValueError, match="balance_target"):
        TrackingConfig(balance_target="pelvis")
    with pytest.raises(ValueError, match="com_frequency_hz"):
        TrackingConfig(com_frequency_hz=0.0)
