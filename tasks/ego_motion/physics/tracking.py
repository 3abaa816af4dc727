"""Simulated tracking: can a humanoid with an unactuated root execute the motion, balancing on its feet?

RLPF's physical feedback (arXiv 2506.12769) is whether a tracking controller executes a motion in a
physics simulator. Here the controller is model-based, as physics-based character animation did it
before learned policies (contact-aware inverse dynamics with balance feedback: Macchietto, Zordan
and Shelton 2009; de Lasa, Mordatch and Hertzmann 2010; the task-space inverse dynamics (TSID)
formulation). At every control update (``control_hz``, PD servos in between):

1. **Desired accelerations** of every degree of freedom, the root's included,
   qdd_des = qacc_ref(t) + Kp (q_ref(t) - q) + Kd (qvel_ref(t) - qvel)   (differences on the
   configuration manifold, ``mj_differentiatePos``), with the reference's velocities and
   accelerations from a Savitzky-Golay fit (``dynamics.smoothed_derivatives``). The root's PD is the
   balance feedback: a pelvis that lags, leans or drops asks for a root acceleration back.
2. **Contact forces and residual, one QP** (``balance.py``): the unactuated root's six rows of
   M qdd + c = S^T tau + J_c^T f + [r; 0] are met by forces at the simulated feet's points touching the
   floor, inside friction pyramids, and by an explicit root residual wrench r (Yuan and Kitani 2020,
   "Residual force control"), bounded by ``residual_bound`` x m g and costed (``residual_weight``);
   what neither supplies is left unmet, so the root falls behind and its PD pulls it back.
3. **Joint torques** from the actuated rows (gravity compensation, the reference's inertial torques,
   the legs' share of the load split), held until the next update, plus the joint PD realised by
   MuJoCo joint springs whose rest pose follows the reference at every simulation step
   (interpolated between frames) and dampers on the velocity error (stiffness explicit, damping
   implicit in ``implicitfast``: stable PD, Tan, Liu and Turk 2011). The residual is applied to the
   root as ``qfrc_applied``; MuJoCo's contact solver then produces the actual contact forces.

**Success** (RLPF's binary signal) needs: every frame executed with the pelvis and the head within
``fail_distance_m`` of the reference's; the mean residual force at most ``max_residual_per_weight``
x m g (bounded and costly as it is, the residual could otherwise hold up a floating motion for as
long as its feet find no floor: success means the feet carried the motion); the simulated pelvis
on average at most ``max_pelvis_rise_m`` above the reference's (a reference whose feet go into the
floor lifts the simulated body, as the floor does not give way); the reference's planted feet sliding
at most ``max_planted_foot_speed_m_per_s`` (friction); and the humanoid reproducing the reference's
motion, not only staying near it (``max_unexecuted_speed_m_per_s``): ``criterion.py`` says why the last
two, which the pelvis and head tolerance misses. Failures are falls, not errors: a
non-finite simulated state also counts as a fall, and a run takes at most T x (steps per frame) steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from ..body.geometry import HEAD_JOINT
from .balance import BalanceController
from .criterion import graded_success, planted_foot_speed, reference_kinematics, unexecuted_speed
from .dynamics import smoothed_derivatives
from .humanoid import Humanoid, fresh_data

TOUCHING_M = 0.005
"""A simulated foot point touches the floor when its bottom is at most this high (m): MuJoCo's soft contacts
sink a few millimetres under load."""


@dataclass(frozen=True)
class TrackingConfig:
    """Controller gains, QP weights and the success criterion of the tracker (SI units)."""

    fail_distance_m: float = 0.25
    """The humanoid has fallen when its pelvis or head is farther than this from the reference (m)."""
    max_residual_per_weight: float = 0.1
    """Success also needs the mean root residual force to stay at most this fraction of body weight."""
    max_pelvis_rise_m: float = 0.01
    """Success also needs the simulated pelvis to sit on average at most this much above the reference's (m):
    a reference whose feet go into the floor lifts the simulated body (the floor does not give way)."""
    max_planted_foot_speed_m_per_s: float = 0.5
    """Success also needs the reference's planted feet to slide at most this fast (m/s,
    :func:`criterion.planted_foot_speed`): a foot that stands on the floor does not slide. Chosen on the 53
    floor-contact post-train motions (1/120 s steps, 60 Hz control): the ground truth's planted feet slide at 0.03 to
    0.23 m/s (median 0.06), the 1 m/s slid edit's at 0.95 to 1.06; 0.5 is about the geometric mean of 0.23 and 0.95.
    Measures on the simulated feet overlapped (``criterion`` module doc)."""
    planted_band_m: float = 0.02
    """A reference foot point is planted when it is at most this far above the motion's contact height (m,
    :func:`criterion.contact_height_m`): the ``PlausibilityConfig.skate_contact_height_m`` of skating."""
    max_unexecuted_speed_m_per_s: float = 0.1
    """Success also needs the humanoid to reproduce the reference's motion, not only to stay near it: the reference's
    path length minus the simulated one, per joint and second, at most this (m/s, :func:`criterion.unexecuted_speed`).
    Chosen on the 53 floor-contact post-train motions: at most 0.03 on the ground truth; the frames-shuffled edits the
    humanoid executed within the pelvis and head tolerance (4 of 53: windows that move little) at least 0.45; 0.1 is
    about their geometric mean."""
    control_hz: float = 60.0
    """Control updates per second (the QP); the joint PD springs act at every simulation step. One update per
    30 fps frame made the humanoid hop and fall; at 1/120 s steps, 120 Hz succeeded on one post-train motion fewer
    than 60 Hz (61 against 62 of 65, a difference within noise) at about twice the cost (docs/ego_motion_rlpf.md)."""
    root_frequency_hz: float = 1.5
    """Natural frequency of the root's PD in the desired accelerations (critically damped): the balance feedback.
    Chosen on the 65 floor-contact post-train motions (1/120 s steps; each also served mirrored, which the tracker
    executes alike), in-sample: the ground truth succeeded on 62 of them at 1.5 Hz (position) and 3 Hz
    (orientation), 59 at 2 and 4 Hz, 58 at 1.5 and 2 Hz, 60-61 at the other pairs tried (docs/ego_motion_rlpf.md);
    differences of one or two motions are not meaningful. A stiffer root asks for wrenches the feet cannot give
    (residual over the bound), a softer one lets the body drift (falls)."""
    root_rotation_frequency_hz: float = 3.0
    """The same for the pelvis orientation (0: none, which on post-train windows made every ground truth fall)."""
    root_damping_ratio: float = 1.0
    contact_band_m: float = 0.02
    """A foot point of the simulated humanoid can carry force when its bottom is at most this high (m)."""
    friction: float = 0.8
    """Friction coefficient of the QP's pyramid: below the simulator's (``HumanoidConfig.friction``), a margin."""
    residual_bound: float = 0.2
    """Bound of the root residual wrench: force <= this x m g per axis, torque <= this x m g x 1 m per axis."""
    residual_weight: float = 3.0
    """Cost of the residual relative to leaving the root's demand unmet (both over m g, squared)."""
    force_weight: float = 1e-3
    """Regularisation of the contact forces (over m g, squared)."""
    continuity_weight: float = 1e-2
    """Cost of changing each point's contact force between control updates (over m g, squared)."""
    smoothing_frames: int = 9
    """Savitzky-Golay window (odd, frames) of the reference's velocities and accelerations."""

    def __post_init__(self) -> None:
        for name in ("fail_distance_m", "control_hz", "root_frequency_hz", "root_damping_ratio", "friction"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"TrackingConfig.{name} must be finite and > 0, got {value!r}.")
        for name in ("max_residual_per_weight", "max_pelvis_rise_m", "max_planted_foot_speed_m_per_s", "planted_band_m",
                     "max_unexecuted_speed_m_per_s", "contact_band_m",
                     "root_rotation_frequency_hz", "residual_bound", "residual_weight", "force_weight",
                     "continuity_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrackingConfig.{name} must be finite and >= 0, got {value!r}.")
        if self.force_weight + self.continuity_weight <= 0:
            raise ValueError("TrackingConfig.force_weight + continuity_weight must be > 0 (the QP needs a "
                             "strictly convex cost in the contact forces).")
        if self.smoothing_frames < 5 or self.smoothing_frames % 2 == 0:
            raise ValueError(f"TrackingConfig.smoothing_frames must be odd and >= 5, got {self.smoothing_frames}.")


@dataclass(frozen=True)
class TrackingResult:
    """Outcome of tracking one motion.

    Attributes:
        success: every frame executed within ``fail_distance_m``, and every success criterion within its bound.
        graded: :func:`criterion.graded_success` of the same criteria, in [0, 1]; 1 iff ``success``.
        survival: fraction of the T frames before the first fall, in [0, 1].
        tracking_error_m: mean joint position error over the survived frames, frame 0 included (m).
        pelvis_rise_m: mean height of the simulated pelvis above the reference's over the survived frames (m).
        foot_slip_m_per_s: mean horizontal speed of the simulated foot points that touch the floor (within
            :data:`TOUCHING_M`) in two consecutive frames (m/s; 0 if none do).
        residual_force_n: (T,) norm of the root residual force applied over each frame's interval (N;
            0 after a fall).
        residual_torque_nm: (T,) norm of the root residual torque (N m; 0 after a fall).
        contact_force_n: (T,) total vertical contact force the QP planned (N).
        simulated_joints: (T, 22, 3) world joint positions of the humanoid per frame (frames after a
            fall repeat the state at the fall).
        planted_foot_speed_m_per_s: how fast the reference's planted feet slide (m/s,
            :func:`criterion.planted_foot_speed`).
        unexecuted_speed_m_per_s: the reference's path length minus the humanoid's, per joint and second, over the
            executed frames, at least frames 0 and 1 (so a fall at frame 1 compares the fallen state: a large
            negative value, harmless to the criterion, which bounds it from above) (m/s,
            :func:`criterion.unexecuted_speed`).
    """

    success: bool
    graded: float
    survival: float
    tracking_error_m: float
    pelvis_rise_m: float
    foot_slip_m_per_s: float
    residual_force_n: np.ndarray
    residual_torque_nm: np.ndarray
    contact_force_n: np.ndarray
    simulated_joints: np.ndarray
    planted_foot_speed_m_per_s: float
    unexecuted_speed_m_per_s: float

    @property
    def assist_n(self) -> float:
        """Mean root residual force over the survived frames (N), the help the motion needed."""
        return float(self.residual_force_n[:self._alive].mean())

    @property
    def assist_torque_nm(self) -> float:
        """Mean root residual torque over the survived frames (N m)."""
        return float(self.residual_torque_nm[:self._alive].mean())

    @property
    def _alive(self) -> int:
        return max(1, round(self.survival * len(self.residual_force_n)))


def success_criteria(cfg: TrackingConfig, residual_per_weight: float, pelvis_rise_m: float,
                     planted_foot_speed_m_per_s: float, unexecuted_speed_m_per_s: float) -> list[tuple[float, float]]:
    """The success criteria beyond surviving every frame, as (measure, bound) pairs with ``cfg``'s bounds: the mean
    root residual force / (m g), the mean pelvis rise (m), the planted feet's speed and the unexecuted motion (m/s).
    A motion that survives succeeds when every measure is at most its bound (module doc)."""
    return [(residual_per_weight, cfg.max_residual_per_weight), (pelvis_rise_m, cfg.max_pelvis_rise_m),
            (planted_foot_speed_m_per_s, cfg.max_planted_foot_speed_m_per_s),
            (unexecuted_speed_m_per_s, cfg.max_unexecuted_speed_m_per_s)]


def track(humanoid: Humanoid, qpos: np.ndarray, fps: float, cfg: TrackingConfig | None = None,
          reference: tuple[np.ndarray, np.ndarray] | None = None, data: mujoco.MjData | None = None) -> TrackingResult:
    """Simulate the balancing tracker (module doc) on the reference motion ``qpos`` (T, nq) sampled at ``fps``.

    Args:
        humanoid: the body's humanoid (``tracker_model``: joint springs and floor contacts).
        qpos: (T, nq) reference configurations (:meth:`Humanoid.qpos`), T >= ``cfg.smoothing_frames``.
        fps: frame rate (frames per second); ``humanoid.config.timestep_s`` must divide 1 / fps into
            whole steps and ``cfg.control_hz`` must divide ``fps``'s steps evenly.
        reference: :func:`criterion.reference_kinematics` of ``humanoid`` and ``qpos`` ((T, 22, 3) joints, (T, 16, 3)
            foot points) when the caller has them (the evaluator takes them from the inverse dynamics' kinematics);
            computed here otherwise.
        data: an ``MjData`` of ``humanoid.tracker_model`` to simulate in, reset here (``mj_resetData``: the run is
            the same as in a new one), so that a caller tracking many motions of one humanoid does not allocate one
            per motion (about 0.6 ms each); a new one otherwise.

    Raises:
        ValueError: bad shapes, non-finite values, too few frames, time steps that do not divide, or a
            ``reference`` of the wrong shapes, or ``data`` of another model.
    """
    cfg = cfg or TrackingConfig()
    model = humanoid.tracker_model
    T = qpos.shape[0]
    if qpos.ndim != 2 or qpos.shape[1] != model.nq or not np.isfinite(qpos).all():
        raise ValueError(f"qpos must be a finite (T, {model.nq}) array from Humanoid.qpos, got shape {qpos.shape}.")
    substeps = round(1.0 / (fps * model.opt.timestep))
    if substeps < 1 or abs(substeps * model.opt.timestep - 1.0 / fps) > 1e-9:
        raise ValueError(f"HumanoidConfig.timestep_s={model.opt.timestep} does not divide a frame of 1/{fps} s into "
                         f"whole steps; use 1 / ({fps:g} x n) for an integer n (e.g. {1.0 / (3 * fps):.6g}).")
    steps_per_update = round(fps * substeps / cfg.control_hz)
    if steps_per_update < 1 or substeps % steps_per_update:
        raise ValueError(f"TrackingConfig.control_hz={cfg.control_hz} must divide the {substeps} simulation steps of "
                         f"a frame at {fps:g} fps evenly (e.g. {fps:g} or {fps * substeps:g}).")
    qvel_ref, qacc_ref = smoothed_derivatives(model, qpos, fps, cfg.smoothing_frames)
    omega = 2 * math.pi * np.repeat([cfg.root_frequency_hz, cfg.root_rotation_frequency_hz], 3)
    kp_root, kd_root = omega**2, 2 * cfg.root_damping_ratio * omega
    joint_damping = model.dof_damping[6:]
    spring = model.qpos_spring  # edited per step; restored below
    saved_spring = spring.copy()
    ids = humanoid.body_ids
    controller = BalanceController(humanoid, cfg)
    # the reference at each simulation step of each frame interval, linear between frames: accelerations and
    # velocities at the step's start, the root's lead over frame t's pose (to first order), spring targets
    # (the joints' quaternions, qpos[7:]) at the step's end (ball-joint springs normalise their quaternion)
    start = (np.arange(substeps) / substeps)[None, :, None]  # (1, S, 1)
    acc_sub = (1 - start) * qacc_ref[:-1, None] + start * qacc_ref[1:, None]  # (T - 1, S, nv)
    vel_sub = (1 - start) * qvel_ref[:-1, None] + start * qvel_ref[1:, None]
    lead = start / fps * qvel_ref[:-1, None, :6]  # (T - 1, S, 6)
    end = start + 1.0 / substeps
    spring_targets = (1 - end) * qpos[:-1, None, 7:] + end * qpos[1:, None, 7:]  # (T - 1, S, nq - 7)
    damping = joint_damping * vel_sub[:, :, 6:]  # (T - 1, S, nv - 6): the dampers act on the velocity error
    updates = substeps // steps_per_update  # per frame interval
    share = steps_per_update / substeps  # of a frame's interval, per control update
    # per update (frame interval, update): root residual (6,) and the QP's vertical contact force per foot point
    residuals, vertical = np.zeros((T, updates, 6)), np.zeros((T, updates, len(humanoid.foot_site_ids)))

    if reference is None:
        reference, reference_feet = reference_kinematics(humanoid, qpos)  # (T, 22, 3) joints, (T, 16, 3) sole corners
    else:
        reference, reference_feet = reference
        if reference.shape != (T, len(ids), 3) or reference_feet.shape != (T, len(controller.point_bodies), 3):
            raise ValueError(f"reference must be reference_kinematics(humanoid, qpos)'s (T, {len(ids)}, 3) joints and "
                             f"(T, {len(controller.point_bodies)}, 3) foot points for T = {T}, got "
                             f"{reference.shape} and {reference_feet.shape}.")
    data = fresh_data(model, data, "humanoid.tracker_model")
    data.qpos[:], data.qvel[:] = qpos[0], qvel_ref[0]
    xpos, qpos_sim, qvel_root = data.xpos, data.qpos, data.qvel[:6]  # views of data's buffers
    applied_root, applied_joints = data.qfrc_applied[:6], data.qfrc_applied[6:]
    # the root rows of mj_differentiatePos(qpos_sim, q_ref) (dt = 1), computed alone: the free joint's position
    # difference and mju_subQuat of its quaternions (what mj_differentiatePos does for a free joint; the joints' rows
    # are not used: their PD is the springs)
    error_root, qdd = np.empty(6), np.empty(model.nv)
    error_pos, error_rot, qdd_root, vel_root = error_root[:3], error_root[3:], qdd[:6], vel_sub[:, :, :6]
    reference_pos, reference_quat = qpos[:, :3], qpos[:, 3:7]
    simulated_pos, simulated_quat = qpos_sim[:3], qpos_sim[3:7]
    joint_springs = spring[7:]
    torques, residual = controller.joint_torques, controller.residual  # the controller's output buffers
    simulated = np.zeros((T, len(ids), 3))
    feet = np.zeros((T, len(controller.point_bodies), 3))  # the simulated sole corners per frame
    checked = [0, HEAD_JOINT]
    reference_checked = reference[:, checked]  # (T, 2, 3)
    fail_sq = cfg.fail_distance_m**2
    failed_at = T
    try:
        mujoco.mj_kinematics(model, data)
        for t in range(T):
            simulated[t] = xpos[ids]
            drift = simulated[t, checked] - reference_checked[t]
            if not (drift * drift).sum(axis=-1).max() <= fail_sq:  # NaN included
                failed_at = t
                simulated[t:] = simulated[t]
                break
            feet[t] = controller.foot_points(data)
            if t == T - 1:
                break
            for u in range(updates):
                step = u * steps_per_update  # the update's step, then steps_per_update - 1 without an update
                joint_springs[:] = spring_targets[t, step]
                mujoco.mj_step1(model, data)  # positions, velocities, M, bias, contacts at the current state
                np.subtract(reference_pos[t], simulated_pos, out=error_pos)
                mujoco.mju_subQuat(error_rot, reference_quat[t], simulated_quat)
                qdd[:] = acc_sub[t, step]
                qdd_root += kp_root * (error_root + lead[t, step]) + kd_root * (vel_root[t, step] - qvel_root)
                controller.update(data, qdd)
                np.add(torques, damping[t, step], out=applied_joints)
                applied_root[:] = residual
                residuals[t, u] = residual
                vertical[t, u] = controller.forces[:, 2]
                mujoco.mj_step2(model, data)
                for plain in range(step + 1, step + steps_per_update):  # the joint PD alone until the next update
                    joint_springs[:] = spring_targets[t, plain]
                    mujoco.mj_step(model, data)
    finally:
        spring[:] = saved_spring
    n = failed_at  # the frames executed: their errors, rises and slips
    errors = np.linalg.norm(simulated[:n] - reference[:n], axis=-1).mean(axis=-1).tolist()
    rises = (simulated[:n, 0, 2] - reference[:n, 0, 2]).tolist()
    planted = feet[:n, :, 2] <= TOUCHING_M  # (n, P)
    both = planted[1:] & planted[:-1]  # a point touching in two consecutive frames
    slips = (np.linalg.norm(feet[1:n, :, :2] - feet[:n - 1, :, :2], axis=-1)[both] * fps).tolist()
    residual_force = np.linalg.norm(residuals[:, :, :3], axis=-1).sum(axis=1) * share  # (T,): over frame t's interval
    residual_torque = np.linalg.norm(residuals[:, :, 3:], axis=-1).sum(axis=1) * share
    contact_force = vertical.sum(axis=-1).sum(axis=1) * share
    survival = failed_at / T
    alive = max(1, failed_at)
    rise = float(np.mean(rises)) if rises else float("nan")
    slip = float(np.mean(slips)) if slips else 0.0
    planted_speed = planted_foot_speed(reference_feet, fps, cfg.planted_band_m)
    executed = max(2, failed_at)  # frames compared; those after a fall repeat the fallen state
    unexecuted = unexecuted_speed(reference[:executed], simulated[:executed], fps)
    criteria = success_criteria(cfg, residual_force[:alive].mean() / humanoid.weight_n, rise, planted_speed, unexecuted)
    success = failed_at == T and all(measure <= bound for measure, bound in criteria)  # NaN fails
    return TrackingResult(success=bool(success), graded=graded_success(survival, criteria), survival=survival,
                          tracking_error_m=float(np.mean(errors)) if errors else float("nan"), pelvis_rise_m=rise,
                          foot_slip_m_per_s=slip,
                          residual_force_n=residual_force, residual_torque_nm=residual_torque,
                          contact_force_n=contact_force, simulated_joints=simulated,
                          planted_foot_speed_m_per_s=planted_speed, unexecuted_speed_m_per_s=unexecuted)
