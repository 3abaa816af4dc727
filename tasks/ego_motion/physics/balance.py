"""The balance controller's control update: contact forces, root residual and joint torques from desired
accelerations, by one small QP (steps 2 and 3 of ``tracking.py``'s module doc).

Given the simulated state (``mj_step1`` done: positions, velocities, mass matrix M, bias c) and
desired accelerations qdd (nv,), the equations of motion

    M qacc + c = S^T tau + J_c^T f + [r; 0]

must hold with the root unactuated. The root's demand b = (M qdd + c)[:6] is met by forces f_k at
the foot points (sole corners) touching the floor (within ``contact_band_m``), each in a 4-edge friction pyramid
(f_k = E w_k, w_k >= 0; ``dynamics.friction_cone_edges``), and by an explicit residual wrench r,
|r_i| <= ``residual_bound`` x m g (x 1 m for torques), chosen by the QP

    min  |N (A w + r - b)|^2 + residual_weight |N r|^2 + force_weight |F w|^2
         + continuity_weight |F w - f_prev|^2

(N scales forces by 1 / (m g) and torques by 1 / (m g x 1 m); F w stacks the points' forces; f_prev
is the previous update's force at each point, zero for a point that was not in contact), solved by
``daqp`` (Arnstrom, Bemporad and Axehill 2022, a dual active-set solver for small dense QPs). What
the contacts and residual leave unmet changes the root's acceleration: qacc = qdd + [delta; 0] with
delta = M_rr^-1 (A w + r - b), and the joint torques follow from the actuated rows:
tau = (M qacc + c)_joints - (J_c^T f)_joints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import daqp
import mujoco
import numpy as np

from .dynamics import friction_cone_edges
from .humanoid import Humanoid

if TYPE_CHECKING:
    from .tracking import TrackingConfig


@dataclass(frozen=True)
class Control:
    """One control update (SI units, world frame for points and forces).

    Attributes:
        joint_torques: (nv - 6,) generalized forces of the 21 ball joints (N m, child frames).
        residual: (6,) root residual: world force (N), then torque in the pelvis frame (N m).
        forces: (P, 3) planned contact force at each foot point (zero where not in contact).
        points: (P, 3) the foot points (``Humanoid.foot_points`` order) of the simulated humanoid.
        qacc: (nv,) the accelerations the update is consistent with (qdd with the root's unmet part).
    """

    joint_torques: np.ndarray
    residual: np.ndarray
    forces: np.ndarray
    points: np.ndarray
    qacc: np.ndarray


class BalanceController:
    """Control updates for one humanoid; keeps the previous update's forces (continuity)."""

    def __init__(self, humanoid: Humanoid, cfg: TrackingConfig) -> None:
        self.cfg, self.model = cfg, humanoid.tracker_model
        self.edges = friction_cone_edges(cfg.friction)  # (3, 4)
        self.weight = humanoid.weight_n
        self.humanoid = humanoid
        self.point_bodies = humanoid.foot_point_bodies  # (P,)
        self.previous = np.zeros((len(self.point_bodies), 3))
        self.residual_bound = np.full(6, cfg.residual_bound * self.weight)
        nv, P = self.model.nv, len(self.point_bodies)
        self._M, self._jacp = np.empty((nv, nv)), np.empty((3, nv))
        # the QP's pieces that do not change between updates, for all P points (sliced to the active ones):
        # per-point force cost blocks, and the bounds of [w (4 P), r (6)]
        per_point = (cfg.force_weight + cfg.continuity_weight) / self.weight**2 * (self.edges.T @ self.edges)  # (4, 4)
        self._force_cost = np.kron(np.eye(P), per_point)
        self._upper = np.concatenate([np.full(4 * P, np.inf), self.residual_bound])
        self._lower = np.concatenate([np.zeros(4 * P), -self.residual_bound])

    def foot_points(self, data: mujoco.MjData) -> np.ndarray:
        """(P, 3) the sole corners (``Humanoid.foot_points``) in ``data``'s state."""
        ids = self.humanoid.geom_ids
        return self.humanoid.foot_points(data.geom_xpos[ids], data.geom_xmat[ids].reshape(-1, 3, 3))

    def __call__(self, data: mujoco.MjData, qdd: np.ndarray) -> Control:
        """The control update for desired accelerations ``qdd`` (nv,) in ``data``'s state (``mj_step1`` done)."""
        model, M = self.model, self._M
        points = self.foot_points(data)
        active = points[:, 2] <= self.cfg.contact_band_m
        rows = []
        for k in np.flatnonzero(active):
            mujoco.mj_jac(model, data, self._jacp, None, points[k], self.point_bodies[k])
            rows.append(self._jacp.copy())
        J = np.concatenate(rows, axis=0) if rows else np.zeros((0, model.nv))  # (3 P, nv)
        mujoco.mj_fullM(model, data, M)
        demand = M @ qdd + data.qfrc_bias  # the generalized force the desired accelerations need
        A = (J[:, :6].T.reshape(6, -1, 3) @ self.edges).reshape(6, -1)  # (6, 4 P): root rows of the edges
        forces, residual = self._solve(A, demand[:6], active)
        contact = J.T @ forces[active].reshape(-1)  # (nv,) J_c^T f
        delta = np.linalg.solve(M[:6, :6], contact[:6] + residual - demand[:6])
        joint_torques = demand[6:] + M[6:, :6] @ delta - contact[6:]
        qacc = qdd.copy()
        qacc[:6] += delta
        return Control(joint_torques=joint_torques, residual=residual, forces=forces, points=points, qacc=qacc)

    def _solve(self, A: np.ndarray, b: np.ndarray, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(forces (P_all, 3), residual (6,)) of the module doc's QP for root rows ``A`` (6, 4 P) of the P
        ``active`` (P_all,) points and the root's demand ``b`` (6,)."""
        cfg, E = self.cfg, self.edges
        P = int(active.sum())
        n_w = 4 * P
        N2 = 1.0 / self.weight**2  # forces over m g, torques over m g x 1 m
        H = np.empty((n_w + 6, n_w + 6))  # N2 (B^T B) for B = [A, I] (A w + r), plus the costs
        H[:n_w, :n_w] = N2 * (A.T @ A) + self._force_cost[:n_w, :n_w]
        H[:n_w, n_w:] = N2 * A.T
        H[n_w:, :n_w] = N2 * A
        H[n_w:, n_w:] = (1.0 + cfg.residual_weight) * N2 * np.eye(6)
        g = np.empty(n_w + 6)
        g[:n_w] = -N2 * (A.T @ b) - cfg.continuity_weight * N2 * (self.previous[active] @ E).reshape(-1)
        g[n_w:] = -N2 * b
        skip = len(self._upper) - 6 - n_w  # the bounds of the inactive points' weights
        x, _, exitflag, _ = daqp.solve(2 * H, 2 * g, np.zeros((0, n_w + 6)), self._upper[skip:], self._lower[skip:])
        if exitflag < 1:  # w = 0, r = 0 is always feasible: numerical trouble only; then no support (it falls)
            x = np.zeros(n_w + 6)
        forces = np.zeros_like(self.previous)
        forces[active] = x[:n_w].reshape(P, 4) @ E.T
        self.previous = forces
        return forces, x[n_w:]
