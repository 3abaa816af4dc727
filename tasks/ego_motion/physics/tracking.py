"""Simulated tracking: can a PD-controlled humanoid with an unactuated root execute the motion?

RLPF's physical feedback (arXiv 2506.12769) is whether a tracking controller executes a generated
motion in a physics simulator. Here the controller is a non-learned computed-torque tracker:

    tau_j = tau_ff,j(t) - kp_j log(q_ref,j(t)^-1 q_j) - kd_j qvel_j      per ball joint j,

with the (optional) feed-forward tau_ff the joint torques of the motion's own inverse dynamics
(``dynamics.py``), and the PD part realised by MuJoCo joint springs whose rest configuration
(``qpos_spring``) is moved to the reference every frame (stiffness explicit, damping implicit in
the ``implicitfast`` integrator).

The root is not actuated except for a **bounded balance aid**: a PD pull of the pelvis towards
its reference pose, clipped to ``assist_fraction`` x m g (force, N) and ``assist_fraction`` x m g
x 1 m (torque, N m). Why: a joint-space PD tracker has no balance strategy, so without any aid
even a motion-capture clip of quiet standing topples within a second (a one-off check); RLPF's
tracker is a learned policy that balances. The aid stands in for that skill, and its bound keeps
the test physical: a motion that needs more help than 30 % of body weight (floating, leaning past
the feet, teleporting) still makes the humanoid fall. For ground truth, though, the aid sits at
its bound most of the time (the joint PD has no gravity compensation): survival then measures
how long 30 % of body-weight support suffices, a graded score of physical consistency. The aid is
recomputed every simulation step: held over a whole frame, ground-truth success on the test
windows fell (a one-off check). Its mean use is reported (``assist_n``).

The simulation starts at the motion's first frame with its finite-difference velocity and runs
``timestep_s`` steps for each frame at ``fps``. The humanoid *fails* at the first frame where its
pelvis or head is farther than ``fail_distance_m`` from the reference's; ``success`` means it
never fails, ``survival`` is the fraction of frames before failure (1 on success), and the
tracking error is the mean joint position error (m) over the frames survived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from ..body.geometry import HEAD_JOINT
from .dynamics import finite_difference_velocities
from .humanoid import Humanoid

ROOT_GYRATION_M = 0.3
"""Radius of gyration (m) that turns body mass into the root aid's rotational inertia."""


def _clip_norm(v: np.ndarray, bound: float) -> np.ndarray:
    norm = math.sqrt(v @ v)
    return v * (bound / norm) if norm > bound else v


@dataclass(frozen=True)
class TrackingConfig:
    """Failure criterion of the tracker."""

    fail_distance_m: float = 0.3
    """The humanoid has fallen when its pelvis or head is farther than this from the reference (m)."""
    feed_forward: bool = False
    """Add the motion's inverse-dynamics joint torques to the PD torques. Off by default: in one-off
    checks on the test windows it lowered ground-truth survival, the finite-difference accelerations
    of 30 fps capture being noisy (docs/ego_motion_rlpf.md)."""
    assist_fraction: float = 0.3
    """Bound of the root balance aid as a fraction of body weight (0 disables it)."""
    assist_frequency_hz: float = 2.0
    """Natural frequency of the root balance aid's PD loop (critically damped)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fail_distance_m) and self.fail_distance_m > 0):
            raise ValueError(f"fail_distance_m must be finite and > 0, got {self.fail_distance_m!r}.")
        if not (math.isfinite(self.assist_fraction) and self.assist_fraction >= 0):
            raise ValueError(f"assist_fraction must be finite and >= 0, got {self.assist_fraction!r}.")
        if not (math.isfinite(self.assist_frequency_hz) and self.assist_frequency_hz > 0):
            raise ValueError(f"assist_frequency_hz must be finite and > 0, got {self.assist_frequency_hz!r}.")


@dataclass(frozen=True)
class TrackingResult:
    """Outcome of tracking one motion.

    Attributes:
        success: the humanoid followed every frame without failing.
        survival: fraction of the T frames before the first failure, in [0, 1].
        tracking_error_m: mean joint position error over the survived frames, frame 0 (error 0) included (m).
        assist_n: mean magnitude of the root balance aid's force over the survived frames (N).
        simulated_joints: (T, 22, 3) world joint positions of the humanoid per frame (frames after a
            failure repeat the state at failure).
    """

    success: bool
    survival: float
    tracking_error_m: float
    assist_n: float
    simulated_joints: np.ndarray


def track(humanoid: Humanoid, qpos: np.ndarray, fps: float, cfg: TrackingConfig | None = None,
          joint_torques_nm: np.ndarray | None = None) -> TrackingResult:
    """Simulate the PD tracker on the reference motion ``qpos`` (T, nq) sampled at ``fps``.

    Args:
        humanoid: the body's humanoid.
        qpos: (T, nq) reference configurations (:meth:`Humanoid.qpos`), T >= 3.
        fps: frame rate (frames per second); ``humanoid.config.timestep_s`` must divide 1 / fps
            into at least one step.
        joint_torques_nm: (T, 21, 3) feed-forward torques (``InverseDynamicsResult.joint_torques_nm``);
            required when ``cfg.feed_forward``.

    Raises:
        ValueError: bad shapes, or feed-forward asked without torques.
    """
    cfg = cfg or TrackingConfig()
    model = humanoid.tracker_model
    T = qpos.shape[0]
    if qpos.ndim != 2 or qpos.shape[1] != model.nq or not np.isfinite(qpos).all():
        raise ValueError(f"qpos must be a finite (T, {model.nq}) array from Humanoid.qpos, got shape {qpos.shape}.")
    if cfg.feed_forward and (joint_torques_nm is None or joint_torques_nm.shape != (T, 21, 3)
                             or not np.isfinite(joint_torques_nm).all()):
        raise ValueError("feed-forward tracking needs finite joint_torques_nm of shape (T, 21, 3) from "
                         "inverse_dynamics(..., joint_torques=True) (or TrackingConfig(feed_forward=False)).")
    substeps = max(1, round(1.0 / (fps * model.opt.timestep)))
    if abs(substeps * model.opt.timestep - 1.0 / fps) > 1e-9:
        raise ValueError(f"HumanoidConfig.timestep_s={model.opt.timestep} does not divide a frame of 1/{fps} s into "
                         f"whole steps; use 1 / ({fps:g} x n) for an integer n (e.g. {1.0 / (3 * fps):.6g}).")
    qvel, _ = finite_difference_velocities(model, qpos, fps)
    reference = mujoco.MjData(model)
    data = mujoco.MjData(model)
    data.qpos[:], data.qvel[:] = qpos[0], qvel[0]
    spring = model.qpos_spring  # edited per frame; restored below
    saved_spring = spring.copy()
    quat_adr = np.concatenate([np.arange(a, a + 4) for a in humanoid.qpos_adr])
    dof_adr = np.concatenate([np.arange(a, a + 3) for a in humanoid.dof_adr])
    ids = humanoid.body_ids
    simulated = np.empty((T, len(ids), 3))
    errors, assists, failed_at = [], [], T
    weight = humanoid.weight_n
    omega = 2 * math.pi * cfg.assist_frequency_hz
    root_inertia = humanoid.total_mass_kg * ROOT_GYRATION_M**2
    kp = np.array([humanoid.total_mass_kg] * 3 + [root_inertia] * 3) * omega**2
    kd = 2 * np.array([humanoid.total_mass_kg] * 3 + [root_inertia] * 3) * omega
    to_reference = np.empty(model.nv)
    try:
        for t in range(T):
            reference.qpos[:] = qpos[t]
            mujoco.mj_kinematics(model, reference)
            if t > 0:
                spring[quat_adr] = qpos[t][quat_adr]
                if cfg.feed_forward:
                    data.qfrc_applied[dof_adr] = joint_torques_nm[t].reshape(-1)
                if cfg.assist_fraction > 0:
                    frame_assist = 0.0
                    for _ in range(substeps):  # the aid is recomputed every simulation step (stable PD)
                        # displacement taking the simulated pose to the reference, root part: world
                        # linear (0:3), pelvis-frame angular (3:6), as the free joint's dofs
                        mujoco.mj_differentiatePos(model, to_reference, 1.0, data.qpos, qpos[t])
                        aid = kp * to_reference[:6] + kd * (qvel[t, :6] - data.qvel[:6])
                        aid[:3] = _clip_norm(aid[:3], cfg.assist_fraction * weight)
                        aid[3:] = _clip_norm(aid[3:], cfg.assist_fraction * weight * 1.0)
                        data.qfrc_applied[:6] = aid
                        frame_assist += math.sqrt(aid[:3] @ aid[:3]) / substeps
                        mujoco.mj_step(model, data)
                    assists.append(frame_assist)
                else:
                    mujoco.mj_step(model, data, substeps)
            else:
                mujoco.mj_kinematics(model, data)
            simulated[t] = data.xpos[ids]
            drift = np.linalg.norm(data.xpos[ids[[0, HEAD_JOINT]]] - reference.xpos[ids[[0, HEAD_JOINT]]], axis=-1)
            if not np.isfinite(drift).all() or drift.max() > cfg.fail_distance_m:
                failed_at = t
                simulated[t:] = simulated[t]
                break
            errors.append(np.linalg.norm(data.xpos[ids] - reference.xpos[ids], axis=-1).mean())
    finally:
        spring[:] = saved_spring
    survival = failed_at / T
    return TrackingResult(success=failed_at == T, survival=survival,
                          tracking_error_m=float(np.mean(errors)) if errors else float("nan"),
                          assist_n=float(np.mean(assists)) if assists else 0.0,
                          simulated_joints=simulated)
