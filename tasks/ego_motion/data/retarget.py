"""Retarget one BVH clip onto the SMPL-H body model and return it in the AMASS layout.

Why rotations, not positions: the CMU skeletons have other proportions than SMPL-H (a short
torso, a root above the hips), so copying joint positions would distort the body. Instead each
mapped joint's *global rotation relative to a reference pose* is transferred:

    G_j(t) = W @ (R_bvh_j(t) @ R_bvh_j(ref)^T) @ A_j        local L_j = G_parent(j)^T @ G_j

W rotates BVH's +Y-up world to our +Z-up world (+90 deg about X: y -> z, z -> -y). A_j aligns the
body model's rest bone direction at limb joint j with the BVH reference pose's (minimal rotation;
identity for the torso, neck, head and collars), so a reference that is not exactly the model's rest pose (the
131_xx arms-down rest, the real SMPL-H's slightly lowered arms) still maps correctly; A_j is near
identity for the bundled model, whose rest skeleton was built from the same T-pose. The model's
rest pose and the BVH references face +Z with +Y up and the body's left on +X.

Translation: the model's hip centre follows the BVH hip centre scaled by the ratio of the model's
to the subject's leg length (hip-knee-ankle), so feet do not slide; then the clip is lowered so
the 1st percentile over frames of the lower toe joint sits at the model's toe-joint clearance
(toe joint height above the sole in the rest pose). Betas are a least-squares fit of the model's
segment lengths to the subject's. Everything is resampled (slerp / linear) to 30 fps.

The ReActIdle idle clips (a 19-joint Blender rig without hands or toes) go through the same
steps with the ``reactidle`` variant: joints the rig lacks get an identity local rotation.

The rig tables live in ``skeletons.py``; ``convert.py`` is the command line over the clips.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..body.body_model import BodyModel
from ..body.geometry import (
    SMPLH_PARENTS,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)
from .amass import TARGET_FPS, AmassSequence
from .bvh import BvhMotion, global_poses, parse_bvh, positions_relative_to_offsets
from .skeletons import (
    _ALIGN_CHILD,
    BODY_JOINTS,
    CHILD_POSITION_TOLERANCE_M,
    LEFT_TOE,
    RIGHT_TOE,
    SEGMENTS,
    W_ZUP_FROM_YUP,
    SkeletonVariant,
    detect_variant,
)

DEFAULT_MOCAP_ROOT = Path(
    os.environ.get("DIFFGRPO_MOCAP_ROOT", Path(__file__).resolve().parents[4] / "shared" / "mocap")
)
"""Where the BVH clips are read from (``cmu_iclone/``, ``cmu_original/``, ``reactidle/``); set
DIFFGRPO_MOCAP_ROOT or pass ``--mocap-root`` to read them elsewhere."""


@dataclass(frozen=True)
class ReferencePose:
    """The rig's reference pose: global rotations (22, 3, 3) and positions (22, 3) in metres (BVH frame),
    plus the wrist-tip positions (2, 3). Unmapped joints: identity rotation, NaN position unless a
    stand-in places them; wrist tips NaN for a rig without hands."""

    R_bvh_joint: np.ndarray
    t_bvh_joint_m: np.ndarray
    t_wrist_tips_m: np.ndarray


def reference_pose(
    motion: BvhMotion, variant: SkeletonVariant, mocap_root: Path = DEFAULT_MOCAP_ROOT
) -> ReferencePose:
    """Reference pose of ``motion``'s rig (see SkeletonVariant.reference)."""
    if variant.reference == "rest":
        ref = global_poses(
            BvhMotion(motion.skeleton, motion.frame_time_s, np.zeros((1, motion.values.shape[1])))
        )
        sk = motion.skeleton
    elif variant.reference == "tpose_frame0":
        path = mocap_root / variant.reference_clip
        if not path.exists():
            raise FileNotFoundError(
                f"the {variant.name} reference T-pose comes from frame 0 of {path}, which is "
                f"missing; set DIFFGRPO_MOCAP_ROOT to the folder holding cmu_iclone/."
            )
        ref_motion = parse_bvh(path)
        ref, sk = global_poses(ref_motion, slice(0, 1)), ref_motion.skeleton
    else:
        raise ValueError(f"unknown reference {variant.reference!r}; use 'rest' or 'tpose_frame0'.")
    R = np.tile(np.eye(3), (BODY_JOINTS, 1, 1))
    t = np.full((BODY_JOINTS, 3), np.nan)
    for j, n in enumerate(variant.joint_map):
        if n is not None:
            R[j], t[j] = ref.R_world_joint[0, sk.index(n)], ref.t_world_joint[0, sk.index(n)]
    for j, n in variant.position_stand_ins:
        t[j] = ref.t_world_joint[0, sk.index(n)]
    tips = np.full((2, 3), np.nan)
    if variant.wrist_tips is not None:
        tips = ref.t_world_joint[0, [sk.index(n) for n in variant.wrist_tips]]
    return ReferencePose(R_bvh_joint=R, t_bvh_joint_m=t * variant.units_to_m, t_wrist_tips_m=tips * variant.units_to_m)


def segment_lengths(joints: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | np.floating | torch.Tensor]:
    """Segment lengths (metres) of a 22+ joint skeleton in SMPL-H order, L/R averaged."""
    out = {}
    for name, pairs in SEGMENTS.items():
        lens = [((joints[..., a, :] - joints[..., b, :]) ** 2).sum(-1) ** 0.5 for a, b in pairs]
        out[name] = sum(lens) / len(lens)
    return out


def subject_segment_lengths(ref: ReferencePose) -> dict[str, float]:
    """The rig's segment lengths (metres) for :func:`fit_betas`, leaving out segments with an end the rig lacks."""
    return {k: float(v) for k, v in segment_lengths(ref.t_bvh_joint_m).items() if np.isfinite(v)}


def fit_betas(
    body: BodyModel, target_lengths_m: dict[str, float], *, prior_weight: float = 1e-3
) -> np.ndarray:
    """Least-squares betas whose shaped segment lengths match ``target_lengths_m``.

    Minimises sum_s (len_s(betas) - target_s)^2 + prior_weight * |betas|^2 with L-BFGS (float64).
    """
    betas = torch.zeros(body.num_betas, dtype=torch.float64, requires_grad=True)
    J_t = body.J_template.double()
    J_s = body.J_shapedirs.double()
    target = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in target_lengths_m.items()}
    opt = torch.optim.LBFGS(
        [betas], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        joints = J_t + torch.einsum("jcb,b->jc", J_s, betas)
        lens = segment_lengths(joints)
        loss = sum((lens[k] - target[k]) ** 2 for k in target) + prior_weight * (betas**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return betas.detach().numpy()


def _min_rotation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking direction a to direction b (3,) -> (3, 3)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(np.dot(a, b))
    s = np.linalg.norm(v)
    if s < 1e-9:
        if c > 0:
            return np.eye(3)
        raise ValueError(
            "reference and model bones point in opposite directions; the reference pose is not "
            "comparable to the model's rest pose."
        )
    K = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) / s
    ang = np.arctan2(s, c)
    return np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * (K @ K)


def alignment_rotations(model_rest_joints: np.ndarray, ref: ReferencePose) -> np.ndarray:
    """A_j (22, 3, 3): maps the model's rest bone directions at joint j onto the reference pose's
    (identity where the reference lacks either end of the bone)."""
    bvh = np.full((52, 3), np.nan)
    bvh[:BODY_JOINTS] = ref.t_bvh_joint_m
    bvh[25], bvh[40] = ref.t_wrist_tips_m  # middle-finger bases stand for the wrist tips
    A = np.tile(np.eye(3), (BODY_JOINTS, 1, 1))
    for j, c in _ALIGN_CHILD.items():
        if np.isfinite(bvh[c] - bvh[j]).all():
            A[j] = _min_rotation(model_rest_joints[c] - model_rest_joints[j], bvh[c] - bvh[j])
    return A


@dataclass(frozen=True)
class RetargetedMotion:
    """Model motion at the source frame rate, world +Z up (floor not yet set).

    R_world_root (F, 3, 3), t_world_root_m (F, 3) pelvis pose; body_rotmats (F, 21, 3, 3) local.
    """

    R_world_root: np.ndarray
    t_world_root_m: np.ndarray
    body_rotmats: np.ndarray
    fps: float


def retarget(
    motion: BvhMotion,
    variant: SkeletonVariant,
    ref: ReferencePose,
    body: BodyModel,
    betas: np.ndarray,
    frames: slice = slice(1, None),
) -> RetargetedMotion:
    """Transfer the global rotations of the mapped joints (see the module docstring); an unmapped
    joint copies its parent's, i.e. gets an identity local rotation."""
    sk = motion.skeleton
    g = global_poses(motion, frames)
    mapped = [j for j, n in enumerate(variant.joint_map) if n is not None]
    idx = [sk.index(variant.joint_map[j]) for j in mapped]
    R_bvh = g.R_world_joint[:, idx]  # (F, M, 3, 3), M mapped joints
    t_bvh = np.full((R_bvh.shape[0], BODY_JOINTS, 3), np.nan)
    t_bvh[:, mapped] = g.t_world_joint[:, idx] * variant.units_to_m
    with torch.no_grad():
        J_rest = body.shaped_joints(torch.as_tensor(betas, dtype=body.J_template.dtype)).double().numpy()
    A = alignment_rotations(J_rest, ref)
    G = np.empty((R_bvh.shape[0], BODY_JOINTS, 3, 3))  # (F, 22, 3, 3)
    G[:, mapped] = W_ZUP_FROM_YUP @ R_bvh @ np.swapaxes(ref.R_bvh_joint[mapped], -1, -2) @ A[mapped]
    for j in range(1, BODY_JOINTS):  # parents come first in SMPL-H order
        if variant.joint_map[j] is None:
            G[:, j] = G[:, SMPLH_PARENTS[j]]
    parents = np.array(SMPLH_PARENTS[1:BODY_JOINTS])
    local = np.swapaxes(G[:, parents], -1, -2) @ G[:, 1:]  # (F, 21, 3, 3)
    leg = lambda J: (
        0.5
        * sum(
            np.linalg.norm(J[..., a, :] - J[..., b, :], axis=-1) for a, b in ((1, 4), (4, 7), (2, 5), (5, 8))
        )
    )
    scale = leg(J_rest) / leg(ref.t_bvh_joint_m)
    hip_centre_bvh = 0.5 * (t_bvh[:, 1] + t_bvh[:, 2])  # (F, 3)
    hip_centre_model = 0.5 * (J_rest[1] + J_rest[2]) - J_rest[0]  # pelvis frame, rest
    t_root = scale * hip_centre_bvh @ W_ZUP_FROM_YUP.T - G[:, 0] @ hip_centre_model
    return RetargetedMotion(R_world_root=G[:, 0], t_world_root_m=t_root, body_rotmats=local, fps=motion.fps)


def resample_motion(m: RetargetedMotion, target_fps: float = TARGET_FPS) -> RetargetedMotion:
    """Resample to ``target_fps``: slerp for rotations, linear for the root position.

    Output frame k is at time k / target_fps for all times within the source duration.
    """
    F = m.R_world_root.shape[0]
    duration = (F - 1) / m.fps
    times = np.arange(int(np.floor(duration * target_fps + 1e-9)) + 1) / target_fps
    src = times * m.fps
    i0 = np.clip(np.floor(src).astype(int), 0, F - 1)
    i1 = np.clip(i0 + 1, 0, F - 1)
    w = torch.as_tensor(src - i0, dtype=torch.float64)
    rots = torch.as_tensor(np.concatenate([m.R_world_root[:, None], m.body_rotmats], 1))  # (F, 22, 3, 3)
    q = matrix_to_quaternion(rots)
    q_new = slerp_quaternions(q[i0], q[i1], w[:, None].expand(-1, rots.shape[1]))
    R_new = quaternion_to_matrix(q_new).numpy()
    wn = (src - i0)[:, None]
    t_new = (1 - wn) * m.t_world_root_m[i0] + wn * m.t_world_root_m[i1]
    return RetargetedMotion(
        R_world_root=R_new[:, 0], t_world_root_m=t_new, body_rotmats=R_new[:, 1:], fps=target_fps
    )


def toe_clearance_m(body: BodyModel, betas: np.ndarray) -> float:
    """Height of the toe joints above the sole in the rest pose (lowest mesh vertex), metres."""
    layer = body.smplx_layer
    with torch.no_grad():
        b = torch.as_tensor(betas, dtype=layer.v_template.dtype)
        verts = layer.v_template + torch.einsum("vcb,b->vc", layer.shapedirs, b)
        toes = body.shaped_joints(b)[[LEFT_TOE, RIGHT_TOE], 1].min()
        return float(toes - verts[:, 1].min())


def to_amass(
    m: RetargetedMotion, body: BodyModel, betas: np.ndarray, *, floor_percentile: float = 1.0
) -> AmassSequence:
    """Set the floor and pack into the AMASS layout (trans = pelvis - J_0(betas))."""
    dtype = body.J_template.dtype
    b = torch.as_tensor(betas, dtype=dtype)
    R_root = torch.as_tensor(m.R_world_root, dtype=dtype)
    t_root = torch.as_tensor(m.t_world_root_m, dtype=dtype)
    with torch.no_grad():
        T_world_root = torch.cat(
            [
                torch.cat([R_root, t_root[:, :, None]], -1),
                torch.tensor([0, 0, 0, 1.0], dtype=dtype).expand(len(R_root), 1, 4),
            ],
            1,
        )
        fk = body.forward_kinematics(
            torch.as_tensor(m.body_rotmats, dtype=dtype), betas=b, T_world_root=T_world_root
        )
        toe_z = fk.t_world_joint[:, [LEFT_TOE, RIGHT_TOE], 2].min(-1).values.double().numpy()
    floor = np.percentile(toe_z, floor_percentile) - toe_clearance_m(body, betas)
    t = m.t_world_root_m - np.array([0.0, 0.0, floor])
    trans = t - body.shaped_joints(b)[0].double().numpy()
    rot = torch.as_tensor(np.concatenate([m.R_world_root[:, None], m.body_rotmats], 1))
    aa = matrix_to_axis_angle(rot).reshape(len(t), -1).numpy()
    poses = np.concatenate([aa, np.zeros((len(t), 90))], 1)
    return AmassSequence(
        poses=poses.astype(np.float32),
        trans=trans.astype(np.float32),
        betas=np.asarray(betas, dtype=np.float32),
        gender="neutral",
        mocap_framerate=float(m.fps),
    )


def convert_bvh(
    path: str | Path,
    body: BodyModel,
    *,
    mocap_root: Path = DEFAULT_MOCAP_ROOT,
    target_fps: float = TARGET_FPS,
    min_frames: int = 30,
) -> AmassSequence:
    """BVH file -> AMASS-layout sequence on ``body`` at ``target_fps`` (frame 0 dropped)."""
    motion = parse_bvh(path)
    if not np.isfinite(motion.values).all():
        raise ValueError(f"{path}: NaN/inf channel values; repair or trim the clip before converting.")
    if not (1.0 <= motion.fps <= 1000.0):
        raise ValueError(
            f"{path}: frame time {motion.frame_time_s} s gives {motion.fps:.3g} fps, outside 1-1000."
        )
    variant = detect_variant(motion.skeleton)
    if variant.child_positions_include_offset:
        motion = positions_relative_to_offsets(
            motion, max_deviation=CHILD_POSITION_TOLERANCE_M / variant.units_to_m
        )
    ref = reference_pose(motion, variant, mocap_root)
    betas = fit_betas(body, subject_segment_lengths(ref))
    m = resample_motion(retarget(motion, variant, ref, body, betas), target_fps)
    if m.body_rotmats.shape[0] < min_frames:
        raise ValueError(
            f"{path}: only {m.body_rotmats.shape[0]} frames at {target_fps} fps after dropping the "
            f"T-pose frame; need at least {min_frames}."
        )
    return to_amass(m, body, betas)
