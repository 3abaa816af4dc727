"""Centroidal quantities of a free-floating humanoid read from its floating root's rows of the mass matrix.

Why: a momentum-based balance controller (Macchietto, Zordan and Shelton 2009; Lee and Goswami 2012; Orin, Goswami
and Lee 2013, "Centroidal dynamics of a humanoid robot") feeds back on the centre of mass and the centroidal angular
momentum instead of the pelvis pose. Nothing new has to be computed for it: the six rows of M qvel that belong to a
MuJoCo free joint (its linear velocity in the world frame, its angular velocity in its own frame) are the whole
body's momentum conjugate to them,

    M[:3] qvel = m c_dot                                   (world linear momentum)
    M[3:6] qvel = R^T (L_G + (c - p) x m c_dot)            (angular momentum about the root's origin p, root frame)

(the partial derivatives of T = 1/2 qvel^T M qvel), and the root's rows of the equations of motion are the Newton and
Euler equations of the whole body at p. Moving the reference point from p to the centre of mass c gives the
centroidal momentum h_G = (m c_dot, L_G) and, for a wrench, the force and the torque about c; the composite
rotational inertia about p, M[3:6, 3:6] (root frame), moves to c by the parallel-axis theorem.

Frames and units: world frame unless "root frame" is said; R = R_world_root; forces N, torques N m, momenta
kg m/s and kg m^2/s.
"""

from __future__ import annotations

import numpy as np


def _check(c: np.ndarray, p: np.ndarray, R: np.ndarray) -> None:
    if c.shape != (3,) or p.shape != (3,) or R.shape != (3, 3):
        raise ValueError(f"com and root_pos must have shape (3,) and R_world_root (3, 3), got {c.shape}, {p.shape}, "
                         f"{R.shape}.")


def centroidal_momentum(root_momentum: np.ndarray, com: np.ndarray, root_pos: np.ndarray,
                        R_world_root: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m c_dot (3,), L_G (3,)) from the free root's generalized momentum ``root_momentum`` = (M qvel)[:6] (module
    doc): the world linear momentum, and the world angular momentum about the centre of mass ``com`` (3,), with the
    root's origin ``root_pos`` (3,) and orientation ``R_world_root`` (3, 3).

    Raises:
        ValueError: shapes other than (6,), (3,), (3,), (3, 3).
    """
    if root_momentum.shape != (6,):
        raise ValueError(f"root_momentum must be the (6,) root rows of M qvel, got shape {root_momentum.shape}.")
    _check(com, root_pos, R_world_root)
    linear = root_momentum[:3]
    return linear.copy(), R_world_root @ root_momentum[3:] - np.cross(com - root_pos, linear)


def root_to_com_wrench(com: np.ndarray, root_pos: np.ndarray, R_world_root: np.ndarray) -> np.ndarray:
    """(6, 6) X mapping a generalized force of the free root (world force; torque about the root's origin, root
    frame) to the same wrench at the centre of mass (world force; world torque about ``com``):
    X [f; tau_p] = [f; R tau_p - (c - p) x f]. Its inverse is [f; tau_G] -> [f; R^T (tau_G + (c - p) x f)].

    Raises:
        ValueError: shapes other than (3,), (3,), (3, 3).
    """
    _check(com, root_pos, R_world_root)
    d = com - root_pos
    X = np.zeros((6, 6))
    X[:3, :3] = np.eye(3)
    X[3:, 3:] = R_world_root
    X[3:, :3] = -np.array([[0.0, -d[2], d[1]], [d[2], 0.0, -d[0]], [-d[1], d[0], 0.0]])  # -[d]_x
    return X


def com_rotational_inertia(M_root: np.ndarray, mass_kg: float, com: np.ndarray, root_pos: np.ndarray,
                           R_world_root: np.ndarray) -> np.ndarray:
    """(3, 3) the whole body's rotational inertia about its centre of mass, world frame (kg m^2), from the root's
    (6, 6) block ``M_root`` of the mass matrix (its angular block is the composite inertia about the root's origin in
    the root frame): I_G = R (I_p - m (|d|^2 1 - d d^T)) R^T with d = R^T (c - p) (parallel-axis theorem).

    Raises:
        ValueError: ``M_root`` not (6, 6), a mass that is not finite and > 0, or the shapes above.
    """
    if M_root.shape != (6, 6):
        raise ValueError(f"M_root must be the (6, 6) root block of the mass matrix, got shape {M_root.shape}.")
    if not (np.isfinite(mass_kg) and mass_kg > 0):
        raise ValueError(f"mass_kg must be finite and > 0, got {mass_kg!r}.")
    _check(com, root_pos, R_world_root)
    d = R_world_root.T @ (com - root_pos)
    I_local = M_root[3:, 3:] - mass_kg * (d @ d * np.eye(3) - np.outer(d, d))
    return R_world_root @ I_local @ R_world_root.T
