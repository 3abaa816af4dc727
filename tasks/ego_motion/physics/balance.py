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

(A (6, 4 P): the root rows of J_c^T E, ``dynamics.root_contact_basis``; N scales forces by 1 / (m g) and torques by
1 / (m g x 1 m); F w stacks the points' forces; f_prev is the previous update's force at each point, zero for a
point that was not in contact), solved by ``daqp`` (Arnstrom, Bemporad and Axehill 2022, a dual active-set solver
for small dense QPs). The Hessian is singular in w (E has a null direction per point), so daqp solves it by proximal
iterations (its automatic ``eps_prox``), which stop short of the exact optimum. The tracker's defaults were chosen
with this solve; solving the same QP exactly (in force variables, where the Hessian is positive definite) moves the
planned forces by about 1 % of m g and changes which ground-truth motions succeed, a few each way, so it is kept as
it is until the defaults are chosen again. With no point in contact the QP is diagonal and solved in closed form,
r = clip(b / (1 + residual_weight), +-bound) (what daqp returns for it, without the call). What the contacts and
residual leave unmet changes the root's acceleration: qacc = qdd + [delta; 0] with
delta = M_rr^-1 ((J_c^T f)_root + r - b), and the joint torques follow from the actuated rows:
tau = (M qacc + c)_joints - (J_c^T f)_joints (J_c^T f by ``mj_applyFT`` at each loaded point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import daqp
import mujoco
import numpy as np

from .dynamics import friction_cone_edges, root_contact_basis
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
        self.weight = humanoid.weight_n
        self.humanoid = humanoid
        self.point_bodies = humanoid.foot_point_bodies  # (P,)
        self.previous = np.zeros((len(self.point_bodies), 3))
        self.residual_bound = np.full(6, cfg.residual_bound * self.weight)
        nv, P = self.model.nv, len(self.point_bodies)
        self._M, self._M_rr, self._contact = np.empty((nv, nv)), np.empty((6, 6)), np.empty(nv)
        self._M_root, self._M_joints_root = self._M[:6, :6], self._M[6:, :6]  # views of M's blocks
        self._contact_root, self._contact_joints = self._contact[:6], self._contact[6:]
        self._delta, self._no_torque = np.empty(6), np.zeros(3)
        self._pelvis = humanoid.body_ids[0]
        # the QP's pieces that do not change between updates, for all P points (sliced to the active ones), as
        # daqp takes them (1/2 x^T H x + g^T x: twice the module doc's cost, so the scale factors carry a 2):
        # per-point force cost blocks, and the bounds of [w (4 P), r (6)]
        self.edges = friction_cone_edges(cfg.friction)  # (3, 4)
        self._edges_T = np.ascontiguousarray(self.edges.T)  # (4, 3)
        N2 = 1.0 / self.weight**2  # forces over m g, torques over m g x 1 m
        per_point = (cfg.force_weight + cfg.continuity_weight) / self.weight**2 * (self.edges.T @ self.edges)  # (4, 4)
        self._force_costs2 = 2 * np.kron(np.eye(P), per_point)  # (4 P, 4 P), sliced to the active points
        self._residual_cost2 = 2 * cfg.residual_weight * N2  # the residual's cost beyond the root rows' term
        self._N2_2, self._continuity2 = 2 * N2, 2 * (cfg.continuity_weight * N2)
        self._upper = np.concatenate([np.full(4 * P, np.inf), self.residual_bound])
        self._lower = np.concatenate([np.zeros(4 * P), -self.residual_bound])
        self._sized: dict[int, tuple] = {}  # per number of active points: ``_pieces``
        self._site_ids, self._bodies = humanoid.foot_site_ids, self.point_bodies.tolist()
        self._bound = None  # the MjData whose arrays ``_bind`` holds

    def _pieces(self, p: int) -> tuple:
        """The QP's pieces for ``p`` active points, made on first use: B = [A, I] (6, 4 p + 6) with its identity block
        in place, the costs beyond 2 N2 B^T B (the force blocks, then the residual's), daqp's (empty) general
        constraints, and the bounds of [w (4 p), r (6)]."""
        if p not in self._sized:
            n_w = 4 * p
            costs = np.zeros((n_w + 6, n_w + 6))
            costs[:n_w, :n_w] = self._force_costs2[:n_w, :n_w]
            costs[n_w:, n_w:] = self._residual_cost2 * np.eye(6)
            skip = len(self._upper) - 6 - n_w  # the bounds of the inactive points' weights
            self._sized[p] = (np.concatenate([np.zeros((6, n_w)), np.eye(6)], axis=1), costs, np.zeros((0, n_w + 6)),
                              (self._upper[skip:].copy(), self._lower[skip:].copy()))
        return self._sized[p]

    def _bind(self, data: mujoco.MjData) -> None:
        """Hold the views of ``data``'s arrays an update reads (MjData's arrays are views of its buffers: fixed for
        its lifetime), so that each update does not fetch them again."""
        self._bound = data
        self._site_xpos, self._qfrc_bias, self._xpos, self._xmat = data.site_xpos, data.qfrc_bias, data.xpos, data.xmat

    def foot_points(self, data: mujoco.MjData) -> np.ndarray:
        """(P, 3) the sole corners (``Humanoid.foot_points``) in ``data``'s state (the model's sites: positions from
        the last kinematics)."""
        if data is not self._bound:
            self._bind(data)
        return self._site_xpos[self._site_ids]

    def __call__(self, data: mujoco.MjData, qdd: np.ndarray) -> Control:
        """The control update for desired accelerations ``qdd`` (nv,) in ``data``'s state (``mj_step1`` done)."""
        model, M, contact = self.model, self._M, self._contact
        if data is not self._bound:
            self._bind(data)
        points = self._site_xpos[self._site_ids]  # (P, 3) the sole corners
        active = np.flatnonzero(points[:, 2] <= self.cfg.contact_band_m)
        mujoco.mj_fullM(model, data, M)
        demand = M @ qdd + self._qfrc_bias  # the generalized force the desired accelerations need
        forces, residual = self._solve(points, active, demand[:6])
        contact[:] = 0.0
        for k in active.tolist():  # J_c^T f, every row
            mujoco.mj_applyFT(model, data, forces[k], self._no_torque, points[k], self._bodies[k], contact)
        self._M_rr[:] = self._M_root
        mujoco.mju_cholFactor(self._M_rr, 0.0)
        mujoco.mju_cholSolve(self._delta, self._M_rr, self._contact_root + residual - demand[:6])
        joint_torques = demand[6:] + self._M_joints_root @ self._delta - self._contact_joints
        qacc = qdd.copy()
        qacc[:6] += self._delta
        return Control(joint_torques=joint_torques, residual=residual, forces=forces, points=points, qacc=qacc)

    def _solve(self, points: np.ndarray, active: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(forces (P_all, 3), residual (6,)) of the module doc's QP for the ``active`` (indices) of the P_all
        ``points`` (P_all, 3) and the root's demand ``b`` (6,), in the bound data's state."""
        cfg, E = self.cfg, self.edges
        forces = np.zeros(self.previous.shape)
        self.previous, previous = forces, self.previous
        P = len(active)
        if P == 0:  # a diagonal QP: each residual component is its own 1-D problem, clipped to its box
            return forces, np.clip(b / (1.0 + cfg.residual_weight), -self.residual_bound, self.residual_bound)
        pelvis = self._pelvis
        A = root_contact_basis(points[active], self._xpos[pelvis], self._xmat[pelvis].reshape(3, 3), E)  # (6, 4 P)
        n_w = 4 * P
        B, costs, no_rows, bounds = self._pieces(P)
        B[:, :n_w] = A
        # daqp minimises 1/2 x^T H x + g^T x: the module doc's cost times 2, for x = [w; r] (A w + r = B x), so
        # H = 2 N2 B^T B + the force and residual costs, g = -2 N2 B^T b - 2 continuity_weight N2 (F^T f_prev)
        H = B.T @ B
        H *= self._N2_2
        H += costs
        g = B.T @ b
        g *= -self._N2_2
        g[:n_w] -= self._continuity2 * (previous[active] @ E).reshape(-1)
        x, _, exitflag, _ = daqp.solve(H, g, no_rows, *bounds)
        if exitflag < 1:  # w = 0, r = 0 is always feasible: numerical trouble only; then no support (it falls)
            x = np.zeros(n_w + 6)
        forces[active] = x[:n_w].reshape(P, 4) @ self._edges_T
        return forces, x[n_w:]
