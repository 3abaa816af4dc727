"""Inverse dynamics of a kinematic motion: the non-physical help it needs, joint torques, contact forces.

A motion q(t) of the humanoid needs, at every frame, the generalized force
tau = M(q) qacc + c(q, qvel) (``mj_inverse`` with contacts disabled; gravity, Coriolis and
centrifugal terms in c). Joints can supply any torque, but the free root has no actuator: its six
components must come from the floor through contact forces f_k at the feet,

    tau_root = sum_k J_k,root^T f_k + r,        f_k in the friction cone of the floor,

and whatever contact cannot supply is the **root residual** r (force in N, torque in N m): the
"hand of god" that a physics simulation would need to add (the residual force of Yuan & Kitani,
"Residual Force Control for Agile Human Behavior Imitation", NeurIPS 2020). We take the smallest
residual in the least-squares sense, over contact forces in a linearized friction cone (4 edges
per point, ``mu`` from the humanoid's config), by non-negative least squares per frame.

Contact candidates are the bottom corners of the two sole boxes of each foot
(``Humanoid.foot_points``: heel to toe joint, toe joint to toe tip, each edge) within
``contact_height_m`` of the floor z = 0. A force f at world point p gives the free root the
generalized force (f, R_root^T ((p - p_root) x f)) (linear in the world frame, angular in the
pelvis frame, as MuJoCo orders a free joint's dofs); the joints' share of the contact forces
(J^T f, ``mj_applyFT``) is only computed when joint torques are asked for. With more than two
supporting points the contact forces that reach the smallest residual are not unique (up to 64 cone
edges for 6 root components): the residual is well defined, but the split of the load between
the feet, and so the joint torques, is the one NNLS happens to pick.

Velocities and accelerations are finite differences at the motion's frame rate on the
configuration manifold (``mj_differentiatePos``): v(t+1/2) = (q(t+1) - q(t)) fps,
qvel(t) = (v(t-1/2) + v(t+1/2)) / 2, qacc(t) = (v(t+1/2) - v(t-1/2)) fps; at the first and last
frames qvel is the one-sided v(1/2) / v(T-3/2) and qacc repeats its neighbour's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import mujoco
import numpy as np
from scipy.optimize import nnls
from scipy.signal import savgol_filter

from ..body.geometry import NUM_BODY_JOINTS
from .humanoid import Humanoid, fresh_data


@dataclass(frozen=True)
class InverseDynamicsConfig:
    """Contact model of the residual computation."""

    contact_height_m: float = 0.05
    """A candidate point supports the body when its lowest point is at most this high (m)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.contact_height_m) and self.contact_height_m >= 0):
            raise ValueError(f"contact_height_m must be finite and >= 0, got {self.contact_height_m!r}.")


@dataclass(frozen=True)
class InverseDynamicsResult:
    """Per-frame inverse dynamics of one motion (T frames), SI units.

    Attributes:
        residual_force_n: (T,) norm of the root residual force (N).
        residual_torque_nm: (T,) norm of the root residual torque about the pelvis (N m).
        joint_torques_nm: (T, 21, 3) torques of the 21 ball joints (SMPL-H order), in the child's frame
            (N m; NaN unless asked for).
        contact_force_n: (T,) total vertical contact force (N).
        num_contacts: (T,) number of supporting candidate points.
    """

    residual_force_n: np.ndarray
    residual_torque_nm: np.ndarray
    joint_torques_nm: np.ndarray
    contact_force_n: np.ndarray
    num_contacts: np.ndarray
    kinematics: MotionKinematics | None = None
    """The motion's forward kinematics, when asked for (``inverse_dynamics(..., kinematics=True)``)."""


@dataclass(frozen=True)
class MotionKinematics:
    """World poses of a motion's parts per frame (T frames; metres, +Z up), from the forward kinematics that
    ``inverse_dynamics`` runs anyway (``mj_inverse``'s position stage: the same numbers as ``mj_kinematics``), so that
    the plausibility measures and the tracker need no kinematics pass of their own.

    Attributes:
        geom_xpos: (T, 22, 3) positions of the 22 collision geoms, SMPL-H joint order (``Humanoid.geom_poses``).
        geom_xmat: (T, 22, 3, 3) their rotations.
        joints: (T, 22, 3) positions of the 22 joints (``criterion.reference_kinematics``' joints).
        foot_points: (T, 16, 3) the sole corners from the model's sites (``criterion.reference_kinematics``' foot
            points).
    """

    geom_xpos: np.ndarray
    geom_xmat: np.ndarray
    joints: np.ndarray
    foot_points: np.ndarray


def finite_difference_velocities(model: mujoco.MjModel, qpos: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(qvel, qacc) each (T, nv) of configurations ``qpos`` (T, nq) sampled at ``fps`` (see module doc).

    Raises:
        ValueError: fewer than 3 frames or a non-positive frame rate.
    """
    T = qpos.shape[0]
    if T < 3 or not fps > 0:
        raise ValueError(f"finite differences need >= 3 frames and fps > 0, got {T} frames at {fps} fps.")
    half = np.empty((T - 1, model.nv))  # v(t + 1/2)
    for t in range(T - 1):
        mujoco.mj_differentiatePos(model, half[t], 1.0 / fps, qpos[t], qpos[t + 1])
    qvel = np.empty((T, model.nv))
    qvel[1:-1] = 0.5 * (half[:-1] + half[1:])
    qvel[0], qvel[-1] = half[0], half[-1]
    qacc = np.empty((T, model.nv))
    qacc[1:-1] = (half[1:] - half[:-1]) * fps
    qacc[0], qacc[-1] = qacc[1], qacc[-2]
    return qvel, qacc


def smoothed_derivatives(model: mujoco.MjModel, qpos: np.ndarray, fps: float,
                         window_frames: int = 9, polyorder: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(qvel, qacc) each (T, nv) of configurations ``qpos`` (T, nq) at ``fps``, from a Savitzky-Golay fit.

    Why: 30 fps capture differentiated twice is noise (central differences amplify a 1 mm jitter to
    about 1 m/s^2); a tracker fed those accelerations fights the noise. On the configuration
    manifold, the motion is first developed into a curve u(t) of tangent coordinates,
    u(t + 1) = u(t) + log(q(t)^-1 q(t + 1)) (``mj_differentiatePos``: world-frame root translation,
    body-frame rotation vectors), exact for rotations about a fixed axis and to first order otherwise;
    then a polynomial of degree ``polyorder`` is fitted by least squares over a sliding window of
    ``window_frames`` frames (Savitzky and Golay 1964; ``scipy.signal.savgol_filter``, the ends fitted
    by the window's polynomial) and differentiated. Quadratic motions are recovered exactly.

    Raises:
        ValueError: fewer frames than ``window_frames``, an even window, ``polyorder`` >= the window, or
            a non-positive frame rate.
    """
    T = qpos.shape[0]
    if window_frames % 2 == 0 or not polyorder < window_frames or T < window_frames or not fps > 0:
        raise ValueError(f"a Savitzky-Golay fit of {window_frames} frames (odd, > polyorder {polyorder}) needs at "
                         f"least {window_frames} frames and fps > 0; got {T} frames at {fps} fps.")
    steps = np.empty((T, model.nv))  # steps[t] = log(q(t-1)^-1 q(t)), steps[0] = 0
    steps[0] = 0.0
    for t in range(1, T):
        mujoco.mj_differentiatePos(model, steps[t], 1.0, qpos[t - 1], qpos[t])
    developed = np.cumsum(steps, axis=0)
    qvel = _savgol_operator(T, window_frames, polyorder, 1, 1.0 / fps) @ developed
    qacc = _savgol_operator(T, window_frames, polyorder, 2, 1.0 / fps) @ developed
    return qvel, qacc


@functools.lru_cache(maxsize=32)
def _savgol_operator(frames: int, window_frames: int, polyorder: int, deriv: int, delta: float) -> np.ndarray:
    """(T, T) the Savitzky-Golay derivative as a matrix: ``savgol_filter(x, ..., axis=0, mode="interp")`` is linear in
    x, so it equals this matrix (the filter applied to the identity's columns) times x. Why: fitting the window's
    polynomials costs about 0.3 ms per call, the matrix product a few microseconds, and every motion of a batch has
    the same T; cached per argument set (a pure function of them), read-only."""
    operator = savgol_filter(np.eye(frames), window_frames, polyorder, deriv=deriv, delta=delta, axis=0, mode="interp")
    operator.flags.writeable = False
    return operator


def friction_cone_edges(mu: float) -> np.ndarray:
    """(3, 4) edges of the linearized friction cone of a floor contact (normal +Z)."""
    return np.array([[mu, -mu, 0.0, 0.0], [0.0, 0.0, mu, -mu], [1.0, 1.0, 1.0, 1.0]])


def root_contact_basis(points: np.ndarray, root_pos: np.ndarray, R_world_root: np.ndarray,
                       edges: np.ndarray) -> np.ndarray:
    """(..., 6, P E): the free root's generalized force of a unit force along each of the E cone edges
    (3, E) at each of the P world points (..., P, 3): (f, R_world_root^T ((p - root_pos) x f)), i.e.
    world-frame force then pelvis-frame torque, MuJoCo's order for a free joint's dofs. Leading axes
    (e.g. frames) broadcast over ``points`` (..., P, 3), ``root_pos`` (..., 3), ``R_world_root`` (..., 3, 3);
    columns are ordered point-major (point 0's E edges first)."""
    points = np.asarray(points)
    arm = points - np.asarray(root_pos)[..., None, :]  # (..., P, 3)
    x, y, z = arm[..., 0], arm[..., 1], arm[..., 2]
    skew = np.zeros((*arm.shape, 3))  # (..., P, 3, 3): [arm]_x f = arm x f
    skew[..., 0, 1], skew[..., 0, 2], skew[..., 1, 2] = -z, y, -x
    skew[..., 1, 0], skew[..., 2, 0], skew[..., 2, 1] = z, -y, x
    generalized = np.empty((*arm.shape[:-1], 6, edges.shape[1]))  # (..., P, 6, E)
    generalized[..., :3, :] = edges
    np.matmul(np.swapaxes(np.asarray(R_world_root), -1, -2)[..., None, :, :] @ skew, edges,
              out=generalized[..., 3:, :])  # R^T [arm]_x E
    return np.swapaxes(generalized, -2, -3).reshape(*generalized.shape[:-3], 6, -1)


def inverse_dynamics(humanoid: Humanoid, qpos: np.ndarray, fps: float, cfg: InverseDynamicsConfig | None = None,
                     joint_torques: bool = False, geom_poses: tuple[np.ndarray, np.ndarray] | None = None,
                     kinematics: bool = False, data: mujoco.MjData | None = None) -> InverseDynamicsResult:
    """Root residual, contact forces and (optionally) joint torques of the motion ``qpos`` (T, nq) at ``fps``.

    Args:
        humanoid: the body's humanoid (:func:`~tasks.ego_motion.physics.humanoid.build_humanoid`).
        qpos: (T, nq) configurations from :meth:`Humanoid.qpos`, T >= 3.
        fps: frame rate of the motion (frames per second).
        joint_torques: also compute the joints' torques (``joint_torques_nm``; NaN otherwise).
        geom_poses: ``humanoid.geom_poses(qpos)`` when the caller has it already (computed otherwise).
        kinematics: also return the motion's forward kinematics (``kinematics``, :class:`MotionKinematics`), recorded
            from the frames' ``mj_inverse`` calls; its geom poses are ``geom_poses`` when given.
        data: an ``MjData`` of ``humanoid.model`` to compute in, reset here (``mj_resetData``), so that a caller
            scoring many motions of one humanoid does not allocate one per motion; a new one otherwise.

    Raises:
        ValueError: wrong ``qpos`` width, non-finite values, fewer than 3 frames, ``data`` of another model.
    """
    cfg = cfg or InverseDynamicsConfig()
    model = humanoid.model
    if qpos.ndim != 2 or qpos.shape[1] != model.nq or not np.isfinite(qpos).all():
        raise ValueError(f"qpos must be a finite (T, {model.nq}) array from Humanoid.qpos, got shape {qpos.shape}.")
    qvel, qacc = finite_difference_velocities(model, qpos, fps)
    T = qpos.shape[0]
    point_bodies = humanoid.foot_point_bodies  # (P,)
    edges = friction_cone_edges(humanoid.config.friction)  # (3, 4)
    data = fresh_data(model, data, "humanoid.model")
    pelvis, geoms = humanoid.body_ids[0], humanoid.geom_ids
    tau = np.empty((T, model.nv))  # needed generalized force per frame, contacts disabled
    root_pos, R_world_root = np.empty((T, 3)), np.empty((T, 3, 3))
    record_geoms = geom_poses is None
    if record_geoms:
        geom_xpos, geom_xmat = np.empty((T, len(geoms), 3)), np.empty((T, len(geoms), 9))
    if kinematics:
        joints, sites = np.empty((T, len(humanoid.body_ids), 3)), np.empty((T, len(humanoid.foot_site_ids), 3))
    q, v, a, frc, xpos, xmat = data.qpos, data.qvel, data.qacc, data.qfrc_inverse, data.xpos, data.xmat  # views
    for t in range(T):
        q[:], v[:], a[:] = qpos[t], qvel[t], qacc[t]
        mujoco.mj_inverse(model, data)  # its kinematics give the geoms' poses too
        tau[t], root_pos[t], R_world_root[t] = frc, xpos[pelvis], xmat[pelvis].reshape(3, 3)
        if record_geoms:
            geom_xpos[t], geom_xmat[t] = data.geom_xpos[geoms], data.geom_xmat[geoms]
        if kinematics:
            joints[t], sites[t] = xpos[humanoid.body_ids], data.site_xpos[humanoid.foot_site_ids]
    if record_geoms:
        geom_poses = geom_xpos, geom_xmat.reshape(T, len(geoms), 3, 3)
    points = humanoid.foot_points(*geom_poses)  # (T, P, 3)
    num_edges = edges.shape[1]
    bases = root_contact_basis(points, root_pos, R_world_root, edges)  # (T, 6, P E), every candidate point
    supporting = points[:, :, 2] <= cfg.contact_height_m  # (T, P)
    columns = np.repeat(supporting, num_edges, axis=1)  # (T, P E): the supporting points' edges
    residual = tau[:, :6].copy()  # (T, 6)
    forces = np.zeros((T, points.shape[1], 3))  # world contact force at each candidate point
    for t in np.flatnonzero(supporting.any(axis=1)):
        basis = bases[t][:, columns[t]]
        weights, _ = nnls(basis, tau[t, :6])
        residual[t] -= basis @ weights
        forces[t, supporting[t]] = weights.reshape(-1, num_edges) @ edges.T
    torques = np.full((T, NUM_BODY_JOINTS, 3), np.nan)
    if joint_torques:
        contact_qfrc = np.zeros(model.nv)
        for t in range(T):
            data.qpos[:] = qpos[t]
            mujoco.mj_kinematics(model, data)
            mujoco.mj_comPos(model, data)  # mj_applyFT needs the frame's kinematics and com positions
            contact_qfrc[:] = 0.0
            for k in np.flatnonzero(supporting[t]):
                mujoco.mj_applyFT(model, data, forces[t, k], np.zeros(3), points[t, k], point_bodies[k], contact_qfrc)
            for j, adr in enumerate(humanoid.dof_adr):
                torques[t, j] = tau[t, adr: adr + 3] - contact_qfrc[adr: adr + 3]
    residual_force = np.linalg.norm(residual[:, :3], axis=1)
    residual_torque = np.linalg.norm(residual[:, 3:], axis=1)
    contact_force = forces[:, :, 2].sum(axis=1)
    num_contacts = supporting.sum(axis=1).astype(np.int64)
    return InverseDynamicsResult(residual_force_n=residual_force, residual_torque_nm=residual_torque,
                                 joint_torques_nm=torques, contact_force_n=contact_force,
                                 num_contacts=num_contacts,
                                 kinematics=MotionKinematics(*geom_poses, joints, sites) if kinematics else None)
