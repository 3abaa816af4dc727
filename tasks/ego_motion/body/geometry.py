"""Rotations and rigid transforms in torch, shared by the body model, the condition, the data and the metrics.

Why one module: every piece of the ego-motion task speaks in 3x3 rotation matrices and 4x4
homogeneous transforms (``T_a_b`` maps points in frame b to frame a). Keeping the conversions
here gives each formula one home. All functions accept any leading batch axes.
"""

from __future__ import annotations

import torch
from torch import Tensor

# SMPL-H kinematic tree: parent of each of the 52 joints (-1 for the pelvis).
# Order: pelvis, L_hip, R_hip, spine1, L_knee, R_knee, spine2, L_ankle, R_ankle, spine3,
# L_foot, R_foot, neck, L_collar, R_collar, head, L_shoulder, R_shoulder, L_elbow, R_elbow,
# L_wrist, R_wrist, then 15 left-hand and 15 right-hand finger joints.
SMPLH_PARENTS: tuple[int, ...] = (
    -1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19,
    20, 22, 23, 20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35,
    21, 37, 38, 21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50,
)  # fmt: skip
SMPLH_JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
    *[f"left_{f}{i}" for f in ("index", "middle", "pinky", "ring", "thumb") for i in (1, 2, 3)],
    *[f"right_{f}{i}" for f in ("index", "middle", "pinky", "ring", "thumb") for i in (1, 2, 3)],
)  # fmt: skip
NUM_BODY_JOINTS = 21  # non-root body joints (SMPL-H joints 1..21)
NUM_HAND_JOINTS = 30
NUM_METRIC_JOINTS = 1 + NUM_BODY_JOINTS
"""22: the pelvis and the 21 body joints, the joints every metric and reward reads."""
FOOT_JOINTS: tuple[int, ...] = (7, 8, 10, 11)
"""SMPL-H indices of left_ankle, right_ankle, left_foot (toes), right_foot (toes)."""
NUM_BETAS = 16
"""Body shape coefficients the prior predicts and the body is posed with (SMPL-H's 16)."""
HEAD_JOINT = 15  # SMPL-H index; index 14 among the 21 non-root body joints


def _mirror_permutation() -> tuple[int, ...]:
    perm = []
    for name in SMPLH_JOINT_NAMES:
        if name.startswith("left_"):
            name = "right_" + name[len("left_") :]
        elif name.startswith("right_"):
            name = "left_" + name[len("right_") :]
        perm.append(SMPLH_JOINT_NAMES.index(name))
    return tuple(perm)


SMPLH_MIRROR_PERMUTATION: tuple[int, ...] = _mirror_permutation()
"""Joint j of a left/right mirrored body is joint ``SMPLH_MIRROR_PERMUTATION[j]`` of the original."""


def skew(v: Tensor) -> Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrix."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues' formula, (..., 3) -> (..., 3, 3); smooth through zero angle."""
    angle_sq = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    angle = angle_sq.clamp_min(1e-24).sqrt()
    small = angle_sq < 1e-8
    # sin(a)/a and (1-cos(a))/a^2 with Taylor series near zero.
    a = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(angle)) / angle_sq.clamp_min(1e-24))
    K = skew(axis_angle)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 3) rotation vectors with angle in [0, pi]; robust near 0 and pi."""
    q = matrix_to_quaternion(R)  # (..., 4) wxyz, w >= 0
    w, xyz = q[..., :1], q[..., 1:]
    norm = xyz.norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(norm, w)
    scale = torch.where(norm > 1e-8, angle / norm.clamp_min(1e-12), 2.0 / w.clamp_min(1e-12))
    return xyz * scale


def matrix_to_quaternion(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 4) unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    m = R
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = torch.stack(
        [
            torch.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2],
                         m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22,
                         m[..., 1, 0] + m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] + m[..., 0, 1],
                         1 - m00 + m11 - m22, m[..., 2, 1] + m[..., 1, 2]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                         m[..., 2, 1] + m[..., 1, 2], 1 - m00 - m11 + m22], -1),
        ],
        dim=-2,
    )  # (..., 4 candidates, 4); candidate i is 4*q_i*q
    diag = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = diag.argmax(-1, keepdim=True)  # (..., 1)
    q = torch.gather(candidates, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """(..., 4) quaternion (w, x, y, z), not necessarily unit -> (..., 3, 3)."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*q.shape[:-1], 3, 3)  # fmt: skip


def slerp_quaternions(q0: Tensor, q1: Tensor, alpha: Tensor) -> Tensor:
    """Spherical interpolation of unit quaternions (..., 4) at fractions alpha (...,), shortest arc."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    theta = torch.acos(dot.abs().clamp(max=1.0))
    sin_theta = torch.sin(theta)
    a = alpha[..., None]
    small = sin_theta < 1e-6  # nearly equal: linear weights are exact to O(theta^2)
    w0 = torch.where(small, 1 - a, torch.sin((1 - a) * theta) / sin_theta.clamp_min(1e-12))
    w1 = torch.where(small, a, torch.sin(a * theta) / sin_theta.clamp_min(1e-12))
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def project_to_so3(M: Tensor) -> Tensor:
    """Nearest rotation (Frobenius) to each (..., 3, 3) matrix via SVD, with det = +1."""
    U, _, Vh = torch.linalg.svd(M)
    det = torch.det(U @ Vh)
    fix = torch.ones_like(M[..., 0])  # (..., 3)
    fix[..., -1] = det.sign()
    return (U * fix[..., None, :]) @ Vh


def rotation_about_z(angle_rad: Tensor) -> Tensor:
    """(...) angles -> (..., 3, 3) rotations about +Z (right-handed)."""
    c, s = torch.cos(angle_rad), torch.sin(angle_rad)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, zero, s, c, zero, zero, zero, one], -1).reshape(*angle_rad.shape, 3, 3)


def geodesic_angle(R_a: Tensor, R_b: Tensor) -> Tensor:
    """Angle in radians of R_a^T R_b, (..., 3, 3) x2 -> (...); stable near 0 and pi."""
    R = R_a.transpose(-1, -2) @ R_b
    return matrix_to_axis_angle(R).norm(dim=-1)


def make_transform(R: Tensor, t: Tensor) -> Tensor:
    """(..., 3, 3) rotation and (..., 3) translation -> (..., 4, 4) homogeneous transform."""
    batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    T = torch.zeros(*batch, 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1.0
    return T


def invert_transform(T: Tensor) -> Tensor:
    """Inverse of rigid (..., 4, 4) transforms without a general matrix inverse."""
    R_inv = T[..., :3, :3].transpose(-1, -2)
    return make_transform(R_inv, -(R_inv @ T[..., :3, 3:4])[..., 0])


def apply_transform(T: Tensor, points: Tensor) -> Tensor:
    """Apply (..., 4, 4) transforms to (..., 3) points."""
    return (T[..., :3, :3] @ points[..., None])[..., 0] + T[..., :3, 3]
