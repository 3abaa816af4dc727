"""The balancing tracker (physics/balance.py, physics/tracking.py): properties that fail when it is wrong."""

from __future__ import annotations

import math

import mujoco
import numpy as np
import pytest
import torch

from tasks.ego_motion.physics.balance import BalanceController
from tasks.ego_motion.physics.criterion import reference_kinematics
from tasks.ego_motion.physics.dynamics import root_contact_basis, smoothed_derivatives
from tasks.ego_motion.physics.edits import EDITS
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator, summarize
from tasks.ego_motion.physics.humanoid import build_humanoid
from tasks.ego_motion.physics.tracking import TrackingConfig, track
from tests.ego_motion import test_physics as physics_tests

FPS = 30.0
body, humanoid = physics_tests.body, physics_tests.humanoid  # the shared module-scoped fixtures
_standing = physics_tests._standing  # the rest pose standing on the floor


def _state(humanoid, qpos: np.ndarray, seed: int) -> mujoco.MjData:
    """Simulator state at ``qpos`` with a random velocity, after ``mj_step1`` (M, bias and contacts computed)."""
    data = mujoco.MjData(humanoid.tracker_model)
    data.qpos[:] = qpos
    data.qvel[:] = 0.3 * np.random.default_rng(seed).normal(size=humanoid.tracker_model.nv)
    mujoco.mj_step1(humanoid.tracker_model, data)
    return data


def test_control_update_meets_the_equations_of_motion_inside_friction_cones(humanoid):
    """M qacc + c (MuJoCo's RNE) equals [r; tau] + J_c^T f (MuJoCo's mj_applyFT at each foot point) in every row,
    the root's six included; every force lies in the QP's friction pyramid and only touches the floor where a foot
    point does; the residual stays inside its bound."""
    cfg = TrackingConfig()
    model = humanoid.tracker_model
    qpos = humanoid.qpos(*_standing(humanoid, 1))[0]
    rng = np.random.default_rng(1)
    for seed in range(3):
        controller = BalanceController(humanoid, cfg)
        data = _state(humanoid, qpos, seed)
        qdd = rng.normal(size=model.nv)
        qdd[:3] += [0.5, -0.3, 1.0]  # the root asks for a push from the floor
        control = controller(data, qdd)
        data.qacc[:] = control.qacc
        needed = np.empty(model.nv)
        mujoco.mj_rne(model, data, 1, needed)  # M qacc + c of the bodies; the joints' armature is in M too
        needed += model.dof_armature * control.qacc
        supplied = np.concatenate([control.residual, control.joint_torques])
        for point, body_id, force in zip(control.points, controller.point_bodies, control.forces, strict=True):
            mujoco.mj_applyFT(model, data, force, np.zeros(3), point, body_id, supplied)
        np.testing.assert_allclose(supplied, needed, atol=1e-6 * humanoid.weight_n)
        assert control.forces[:, 2].sum() > 0.5 * humanoid.weight_n  # the feet carry the body
        fx, fy, fz = control.forces.T
        assert np.all(fz >= -1e-9) and np.all(np.abs(fx) + np.abs(fy) <= cfg.friction * fz + 1e-6)
        lifted = control.points[:, 2] > cfg.contact_band_m
        assert np.all(control.forces[lifted] == 0)
        assert np.all(np.abs(control.residual) <= cfg.residual_bound * humanoid.weight_n + 1e-6)


def test_the_qps_contact_rows_are_root_contact_basis_and_update_equals_call(humanoid):
    """The controller computes the QP's contact rows B[:, :4 P] in place (no ``root_contact_basis`` call per update):
    they must be ``dynamics.root_contact_basis`` of the loaded points, bit for bit; and ``update`` (the tracking loop's
    path, into the controller's buffers) must give what ``__call__`` (a ``Control``) gives, bit for bit."""
    cfg = TrackingConfig()
    qpos = humanoid.qpos(*_standing(humanoid, 1))[0]
    rng = np.random.default_rng(2)
    for seed in range(3):
        data = _state(humanoid, qpos, seed)
        qdd = rng.normal(size=humanoid.tracker_model.nv)
        called, updated = BalanceController(humanoid, cfg), BalanceController(humanoid, cfg)
        for _ in range(2):  # the second update has a previous force (the continuity term)
            control = called(data, qdd)
            updated.update(data, qdd)
            for name in ("joint_torques", "residual", "forces", "points"):
                np.testing.assert_array_equal(getattr(updated, name), getattr(control, name), err_msg=name)
        active = np.flatnonzero(control.points[:, 2] <= cfg.contact_band_m)
        assert len(active) > 0
        pelvis = humanoid.body_ids[0]
        expected = root_contact_basis(control.points[active], data.xpos[pelvis], data.xmat[pelvis].reshape(3, 3),
                                      called.edges)
        np.testing.assert_array_equal(called._pieces(len(active))[0][:, :4 * len(active)], expected)


def test_a_run_in_reused_data_with_a_given_reference_is_the_same_run(humanoid):
    """``track`` with a reused ``MjData`` (after another motion's run) and the reference kinematics handed in (as the
    evaluator does) gives the very same result as a run of its own; data of another model and a reference of the
    wrong shape are refused."""
    standing = humanoid.qpos(*_standing(humanoid, 16))
    T_world_root, rotmats = _standing(humanoid, 16)
    T_world_root[:, 2, 3] += 0.3
    lifted = humanoid.qpos(T_world_root, rotmats)
    alone = track(humanoid, standing, FPS)
    data = mujoco.MjData(humanoid.tracker_model)
    track(humanoid, lifted, FPS, data=data)  # leaves a fallen state, forces and warm starts behind
    again = track(humanoid, standing, FPS, reference=reference_kinematics(humanoid, standing), data=data)
    for name in ("success", "graded", "survival", "tracking_error_m", "pelvis_rise_m", "foot_slip_m_per_s",
                 "residual_force_n", "residual_torque_nm", "contact_force_n", "simulated_joints",
                 "planted_foot_speed_m_per_s", "unexecuted_speed_m_per_s"):
        np.testing.assert_array_equal(getattr(again, name), getattr(alone, name), err_msg=name)
    with pytest.raises(ValueError, match="tracker_model"):
        track(humanoid, standing, FPS, data=mujoco.MjData(humanoid.model))
    joints, feet = reference_kinematics(humanoid, standing)
    with pytest.raises(ValueError, match="reference"):
        track(humanoid, standing, FPS, reference=(joints[1:], feet[1:]))


def test_a_floating_body_gets_only_the_bounded_residual(humanoid):
    """With no foot near the floor nothing can be pushed on: no contact force, the residual at its bound
    upward (the body needs m g), and the root falls at the rest of g."""
    cfg = TrackingConfig()
    T_world_root, rotmats = _standing(humanoid, 1)
    T_world_root[:, 2, 3] += 0.3
    data = _state(humanoid, humanoid.qpos(T_world_root, rotmats)[0], seed=0)
    data.qvel[:] = 0.0
    mujoco.mj_step1(humanoid.tracker_model, data)
    control = BalanceController(humanoid, cfg)(data, np.zeros(humanoid.tracker_model.nv))
    assert np.all(control.forces == 0)
    assert control.residual[2] == pytest.approx(cfg.residual_bound * humanoid.weight_n, rel=1e-6)
    assert control.qacc[2] < -0.7 * 9.81


def test_quiet_standing_is_held_for_ten_seconds(humanoid):
    frames = 300
    result = track(humanoid, humanoid.qpos(*_standing(humanoid, frames)), FPS)
    assert result.success and result.survival == 1.0
    assert result.tracking_error_m < 0.05
    assert result.assist_n < 0.02 * humanoid.weight_n  # the feet carry it: almost no residual
    assert result.contact_force_n[frames // 2:].mean() == pytest.approx(humanoid.weight_n, rel=0.1)


def test_quiet_standing_sunk_into_the_floor_is_not_executed(humanoid):
    """The standing of the test above with its feet 5 cm into the floor: the floor lifts the simulated pelvis by
    about that much, which fails the pelvis-rise criterion. (The same standing drifting at 1 m/s: test_criterion.py.)"""
    sunk = track(humanoid, humanoid.qpos(*EDITS["sunk 5 cm"](*_standing(humanoid, 64))), FPS)
    assert not sunk.success and sunk.survival == 1.0 and 0.03 < sunk.pelvis_rise_m < 0.06


def test_smoothed_derivatives_are_exact_for_a_quadratic_path_and_quiet_on_jitter(humanoid):
    """The Savitzky-Golay fit recovers a parabola's velocity and acceleration at every frame (ends included),
    and turns 1 mm of white jitter into far less acceleration than central differences do."""
    t = np.arange(20) / FPS
    qpos = np.tile(humanoid.model.qpos0, (20, 1))
    qpos[:, 0] = 0.3 * t + 0.5 * 2.0 * t**2
    qvel, qacc = smoothed_derivatives(humanoid.model, qpos, FPS)
    np.testing.assert_allclose(qvel[:, 0], 0.3 + 2.0 * t, atol=1e-9)
    np.testing.assert_allclose(qacc[:, 0], 2.0, atol=1e-7)
    qpos[:, 0] = 0.001 * np.random.default_rng(0).normal(size=20)
    _, qacc = smoothed_derivatives(humanoid.model, qpos, FPS)
    central = np.diff(qpos[:, 0], 2) * FPS**2
    assert np.abs(qacc[:, 0]).mean() < 0.2 * np.abs(central).mean()
    with pytest.raises(ValueError, match="at least 9 frames"):
        smoothed_derivatives(humanoid.model, qpos[:5], FPS)


# Test windows the tracker executes at its defaults with a margin (measured once: residual 0.047 and 0.046 m g against
# the 0.1 allowed): walks at 1.1 and 0.3 m/s of the pelvis (clips 006_01 and 131_02). The first stands on the floor
# (its feet's contact height 0.4 cm); the second floats 2.3 cm, so sunk 5 cm it is only 2.7 cm into the floor, which
# its simulated pelvis rise (-0.3 cm, measured once) does not show.
EXECUTED_TEST_WINDOWS = (24, 31)


@pytest.fixture(scope="module")
def test_windows():
    from tasks.ego_motion.task import EgoMotionTask

    return EgoMotionTask().load_examples("test", torch.tensor(EXECUTED_TEST_WINDOWS))


@pytest.mark.slow
def test_captured_walks_are_executed_and_their_edits_are_not(body, test_windows):
    """Ground truth: executed with little residual. Lifted, leaned, shuffled and slid: never (slid: the humanoid
    follows the drift, but the reference's planted feet slide). Sunk 5 cm: not executed where the capture stands on
    the floor (the first window; the second floats, see ``EXECUTED_TEST_WINDOWS``)."""
    edits_failed = {name: 0 for name in EDITS}
    for i in range(len(EXECUTED_TEST_WINDOWS)):
        betas = torch.nn.functional.pad(test_windows["betas"][i].double(), (0, body.num_betas - 16))
        h = build_humanoid(body.shaped_joints(betas)[:22])
        motion = (test_windows["T_world_root"][i].double(), test_windows["body_rotmats"][i].double())
        pelvis_speed = (motion[0][-1, :2, 3] - motion[0][0, :2, 3]).norm() / (len(motion[0]) / FPS)
        assert 0.3 < pelvis_speed < 1.5  # a walk, not standing
        truth = track(h, h.qpos(*motion), FPS)
        assert truth.success and truth.assist_n < 0.1 * h.weight_n, (i, truth.survival, truth.assist_n / h.weight_n)
        for name, edit in EDITS.items():
            edited = track(h, h.qpos(*edit(*motion)), FPS)
            edits_failed[name] += not edited.success
            if name == "sunk 5 cm" and i == 0:
                assert not edited.success, (edited.pelvis_rise_m, edited.assist_n / h.weight_n)
    assert edits_failed["lifted 0.3 m"] == edits_failed["leaned 0->60 deg"] == edits_failed["frames shuffled"] == 2
    assert edits_failed["slid 1 m/s"] == 2


def test_evaluator_reports_the_residual_and_scores_bad_rows_as_invalid(body, humanoid, caplog):
    """Standing: little residual; lifted: the residual at work and no success; a NaN pose or betas that build no
    humanoid: that row invalid (named in the log), the others scored as alone; too short a window: an error."""
    T_world_root, rotmats = _standing(humanoid, 16)
    lifted = T_world_root.clone()
    lifted[:, 2, 3] += 0.3
    nan_pose = rotmats.clone()
    nan_pose[3, 5, 0, 0] = float("nan")
    betas = torch.zeros(4, 16, dtype=torch.float64)
    betas[3] = 1e308  # overflows the shaped skeleton
    decoded = {"T_world_root": torch.stack([T_world_root, lifted, T_world_root, T_world_root]),
               "body_rotmats": torch.stack([rotmats, rotmats, nan_pose, rotmats]), "betas": betas}
    evaluator = PhysicsEvaluator(body)
    with caplog.at_level("WARNING"):
        measures = evaluator.evaluate(decoded)
    assert measures["invalid"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert "row 2" in caplog.text and "body_rotmats" in caplog.text and "row 3" in caplog.text
    assert measures["tracking_residual_per_weight"][0] < 0.02 < 0.1 < measures["tracking_residual_per_weight"][1]
    assert measures["tracking_success"].tolist() == [1.0, 0.0, 0.0, 0.0]
    summary = summarize(measures)
    assert summary["invalid"] == 0.5 and math.isfinite(summary["tracking_residual_per_weight"])
    alone = PhysicsEvaluator(body).evaluate({k: v[:1] for k, v in decoded.items()})
    assert measures["tracking_residual_per_weight"][0] == alone["tracking_residual_per_weight"][0]
    with pytest.raises(ValueError, match="smoothing_frames"):
        evaluator.evaluate({k: v[:, :5] if k != "betas" else v for k, v in decoded.items()})


def test_sole_corners_are_where_the_simulator_touches_the_floor(humanoid):
    """A foot turned about every axis and lowered until one sole corner is 2 mm into the floor: MuJoCo's own
    box-floor contact lies under that corner (``Humanoid.foot_points``, the controller's contact candidates), and
    the corner's height is the sole's lowest point (``Humanoid.lowest_points``, an independent formula)."""
    model = humanoid.tracker_model
    T_world_root, rotmats = _standing(humanoid, 1)
    rng = np.random.default_rng(0)
    ankle = 7 - 1  # left ankle among the 21 body joints
    for _ in range(3):
        rotmats[0, ankle] = torch.as_tensor(_random_rotation(rng, max_angle_rad=0.5))
        qpos = humanoid.qpos(T_world_root, rotmats)[0]
        data = mujoco.MjData(model)
        data.qpos[:] = qpos
        mujoco.mj_kinematics(model, data)
        ids = humanoid.geom_ids
        corners = BalanceController(humanoid, TrackingConfig()).foot_points(data)[:4]  # the left ankle's sole
        lowest = humanoid.lowest_points(data.geom_xpos[ids], data.geom_xmat[ids].reshape(-1, 3, 3))[7]
        assert corners[:, 2].min() == pytest.approx(lowest, abs=1e-9)
        data.qpos[2] -= corners[:, 2].min() + 0.002  # that corner 2 mm into the floor, every other point above
        mujoco.mj_forward(model, data)
        touching = [data.contact[k].pos for k in range(data.ncon) if ids[7] in (data.contact[k].geom1,
                                                                                 data.contact[k].geom2)]
        assert touching, "the turned sole should touch the floor at its lowest corner"
        corner = corners[np.argmin(corners[:, 2])]
        assert np.linalg.norm(touching[0][:2] - corner[:2]) < 2e-3


def test_sole_corner_sites_are_the_foot_points(humanoid):
    """The controller reads the sole corners from MuJoCo's sites (``Humanoid.foot_site_ids``); the inverse dynamics
    and the plausibility compute them from the geoms' poses (``Humanoid.foot_points``): in poses with every joint
    turned, the two agree on all 16 points, in both compiled models."""
    T_world_root, rotmats = _standing(humanoid, 1)
    rng = np.random.default_rng(2)
    for _ in range(3):
        for j in range(rotmats.shape[1]):
            rotmats[0, j] = torch.as_tensor(_random_rotation(rng, max_angle_rad=1.0))
        qpos = humanoid.qpos(T_world_root, rotmats)[0]
        for model in (humanoid.model, humanoid.tracker_model):
            data = mujoco.MjData(model)
            data.qpos[:] = qpos
            mujoco.mj_kinematics(model, data)
            ids = humanoid.geom_ids
            expected = humanoid.foot_points(data.geom_xpos[ids], data.geom_xmat[ids].reshape(-1, 3, 3))
            np.testing.assert_allclose(data.site_xpos[humanoid.foot_site_ids], expected, atol=1e-12)


def _random_rotation(rng: np.random.Generator, max_angle_rad: float) -> np.ndarray:
    """A rotation matrix about a random axis by an angle of up to ``max_angle_rad`` (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0.2, 1.0) * max_angle_rad
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def test_physics_sweep_refuses_overrides_with_a_baseline_and_runs_one_window_per_motion():
    """The older tracker runs at its own defaults, so overrides with --baseline are an error, not silently ignored;
    the sweep's windows are the unmirrored ones, one per motion, whose mirrors are the remaining served windows."""
    import dataclasses

    from recipes.benchmarks import bench_physics
    from tasks.ego_motion.physics.humanoid import HumanoidConfig
    from tasks.ego_motion.task import EgoMotionTask, EgoMotionTaskConfig

    task = EgoMotionTask(dataclasses.replace(EgoMotionTaskConfig(), floor_contact_m=bench_physics.FLOOR_CONTACT_M))
    for tracking, humanoid in ((TrackingConfig(control_hz=120.0), HumanoidConfig()),
                               (TrackingConfig(), HumanoidConfig(timestep_s=1 / 60))):
        with pytest.raises(ValueError, match="--baseline"):
            bench_physics.sweep(task, "post_train", tracking, humanoid, baseline="baseline_tasks")
    kept = task.kept_windows("post_train")
    mirrored = task.windows("post_train").get(kept)["mirrored"]
    motions = bench_physics._unmirrored(task, "post_train")
    assert not mirrored[motions].any() and 0 < 2 * len(motions) == len(kept)  # each served motion with its mirror


def test_separation_changes_names_each_flipped_window_and_kind():
    """The benchmark's per-window comparison of two separation results (a faster revision against the docs' results)
    counts every (window, kind), names those whose success differs, and refuses results of different windows."""
    from recipes.benchmarks.bench_physics import separation_changes

    def result(success: bool, residual: float, window: int = 3) -> dict:
        kinds = {"ground truth": {"success": True, "survival": 1.0, "residual_per_weight": 0.05},
                 "slid 1 m/s": {"success": success, "survival": 1.0, "residual_per_weight": residual}}
        return {"separation": {"test": {"rows": dict.fromkeys(kinds), "ground_truth_windows": [
            {"window": window, "sequence": "007_12", "kinds": kinds}]}}}

    assert separation_changes(result(False, 0.1), result(False, 0.1)).startswith("0 of 2 (window, kind) runs")
    changed = separation_changes(result(True, 0.13), result(False, 0.1))
    assert changed.startswith("1 of 2") and "test window 3 (007_12), slid 1 m/s: False -> True" in changed
    assert "residual 0.0300 m g" in changed
    with pytest.raises(ValueError, match="different test windows"):
        separation_changes(result(False, 0.1), result(False, 0.1, window=4))


def test_sweep_table_adds_the_detailed_columns_only_when_every_record_has_them():
    """``--table-from`` of ``--sweep`` records: the residual's quantiles, joint error, pelvis rise and edit counts are
    columns when every record carries them (split named when records of both splits are mixed); older records keep
    the older table."""
    from recipes.benchmarks.bench_physics import EDITS, SUNK_BELOW_CONTACT, sweep_table

    def record(split: str, detailed: bool) -> dict:
        result = {"split": split, "motions": 53, "success": 0.5, "survival": 0.9, "residual_per_weight": 0.04,
                  "ms_per_motion": 50.0, "failing": {"fell": 1}}
        if detailed:
            result.update(residual_quantiles={"q50": 0.021, "q90": 0.082, "q100": 0.153},
                          tracking_error_mm={"q50": 22.4, "q90": 46.5}, pelvis_rise_cm_q50=-0.3,
                          edits_executed={name: i for i, name in enumerate((*EDITS, SUNK_BELOW_CONTACT))})
        return {"tracking": {"residual_weight": 4.0}, "humanoid": {}, "result": result}

    detailed = sweep_table([record("post_train", True), record("test", True)]).splitlines()
    assert "| post_train: residual_weight 4 |" in detailed[2] and detailed[3].startswith("| test: residual_weight 4 |")
    assert detailed[2].endswith("| 0.021 / 0.082 / 0.153 | 22.4 / 46.5 | -0.30 | 0 / 1 / 2 / 3 / 4 / 5 |")
    assert detailed[0].count("|") == detailed[1].count("|") == detailed[2].count("|")
    plain = sweep_table([record("post_train", True), record("post_train", False)]).splitlines()
    assert plain[2].endswith("| 50 |") and "post_train:" not in plain[2] and plain[0].count("|") == 7
