"""Retarget CMU (and ReActIdle) BVH clips onto the SMPL-H body model and write them in the AMASS layout.

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

Run ``python -m tasks.ego_motion.data.convert`` to rebuild ``assets/cmu``, and
``python -m tasks.ego_motion.data.convert --reactidle`` to build ``runs/reactidle_amass`` (not committed).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..body.body_model import BodyModel, load_body_model
from ..body.geometry import (
    SMPLH_PARENTS,
    matrix_to_axis_angle,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)
from .amass import TARGET_FPS, AmassSequence, save_amass_npz
from .bvh import BvhMotion, BvhSkeleton, global_poses, parse_bvh, positions_relative_to_offsets

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MOCAP_ROOT = Path(
    os.environ.get("DIFFGRPO_MOCAP_ROOT", Path(__file__).resolve().parents[4] / "shared" / "mocap")
)
CMU_INCH_SCALE_M = 0.056444  # CMU "inches x 0.45" -> metres
# +90 deg about X: BVH (+Y up) -> world (+Z up).
W_ZUP_FROM_YUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
BODY_JOINTS = 22  # pelvis + 21
REQUIRED_JOINTS: tuple[int, ...] = (0, 1, 2, 4, 5, 7, 8)  # pelvis, hips, knees, ankles
CHILD_POSITION_TOLERANCE_M = 0.05  # see SkeletonVariant.child_positions_include_offset


@dataclass(frozen=True)
class SkeletonVariant:
    """A BVH rig family: the BVH joint for each of the 22 SMPL-H body joints, units, reference pose.

    joint_map: 22 BVH joint names in SMPL-H order; None where the rig has no counterpart: that
    joint gets a neutral (identity) local rotation, i.e. it turns with its SMPL-H parent.
    wrist_tips: BVH joints past the (left, right) wrists used to align the hand direction (None:
    the rig has no hands). reference: "rest" (all channels zero) or "tpose_frame0" (frame 0 of
    ``reference_clip``, a file in the mocap folder). position_stand_ins: (SMPL-H joint, BVH joint)
    pairs placing an unmapped joint (e.g. a forearm End Site is the wrist) for the limb alignment
    and the betas fit only. child_positions_include_offset: the non-root position channels hold the
    whole local translation, OFFSET included (Blender's exporter); see
    :func:`~tasks.ego_motion.data.bvh.positions_relative_to_offsets`.
    """

    name: str
    units_to_m: float
    joint_map: tuple[str | None, ...]
    wrist_tips: tuple[str, str] | None
    reference: str
    reference_clip: str = ""
    position_stand_ins: tuple[tuple[int, str], ...] = ()
    child_positions_include_offset: bool = False

    def __post_init__(self) -> None:
        if len(self.joint_map) != BODY_JOINTS:
            raise ValueError(f"{self.name}: joint_map has {len(self.joint_map)} entries, expected {BODY_JOINTS}.")
        unmapped = [j for j in REQUIRED_JOINTS if self.joint_map[j] is None]
        if unmapped:
            raise ValueError(f"{self.name}: SMPL-H joints {unmapped} must be mapped (root, hips, knees and "
                             "ankles place the root and scale the translation).")

    def bvh_joint_names(self) -> tuple[str, ...]:
        """Every BVH joint this variant reads (mapped joints, stand-ins, wrist tips)."""
        names = [n for n in self.joint_map if n is not None] + [n for _, n in self.position_stand_ins]
        return tuple(names + list(self.wrist_tips or ()))


def _cc(s: str) -> str:
    return f"CC_Base_{s}"


VARIANTS: dict[str, SkeletonVariant] = {
    # Reallusion CC rig (cmu_iclone): its zero-channel bind pose is not a T-pose (bone axes differ),
    # so the reference is the clean T-pose in frame 0 of 007_03 (same rig in every iclone clip).
    "cc_iclone": SkeletonVariant(
        name="cc_iclone",
        units_to_m=0.01,
        joint_map=tuple(
            _cc(s)
            for s in (
                "Hip",
                "L_Thigh",
                "R_Thigh",
                "Waist",
                "L_Calf",
                "R_Calf",
                "Spine01",
                "L_Foot",
                "R_Foot",
                "Spine02",
                "L_ToeBase",
                "R_ToeBase",
                "NeckTwist01",
                "L_Clavicle",
                "R_Clavicle",
                "Head",
                "L_Upperarm",
                "R_Upperarm",
                "L_Forearm",
                "R_Forearm",
                "L_Hand",
                "R_Hand",
            )
        ),
        wrist_tips=(_cc("L_Mid1"), _cc("R_Mid1")),
        reference="tpose_frame0",
        reference_clip="cmu_iclone/007/007_03.bvh",
    ),
    # Original CMU skeleton, MotionBuilder-friendly names (01_01).
    "cmu_mb": SkeletonVariant(
        name="cmu_mb",
        units_to_m=CMU_INCH_SCALE_M,
        joint_map=(
            "Hips",
            "LeftUpLeg",
            "RightUpLeg",
            "LowerBack",
            "LeftLeg",
            "RightLeg",
            "Spine",
            "LeftFoot",
            "RightFoot",
            "Spine1",
            "LeftToeBase",
            "RightToeBase",
            "Neck",
            "LeftShoulder",
            "RightShoulder",
            "Head",
            "LeftArm",
            "RightArm",
            "LeftForeArm",
            "RightForeArm",
            "LeftHand",
            "RightHand",
        ),
        wrist_tips=("LFingers", "RFingers"),
        reference="rest",
    ),
    # Original CMU skeleton, 3dsMax-friendly names (131_xx); its rest pose has the arms down.
    "cmu_max": SkeletonVariant(
        name="cmu_max",
        units_to_m=CMU_INCH_SCALE_M,
        joint_map=(
            "Hips",
            "LeftHip",
            "RightHip",
            "lowerback",
            "LeftKnee",
            "RightKnee",
            "Chest",
            "LeftAnkle",
            "RightAnkle",
            "Chest2",
            "LeftToe",
            "RightToe",
            "lowerneck",
            "LeftCollar",
            "RightCollar",
            "Head",
            "LeftShoulder",
            "RightShoulder",
            "LeftElbow",
            "RightElbow",
            "LeftWrist",
            "RightWrist",
        ),
        wrist_tips=("LFingers", "RFingers"),
        reference="rest",
    ),
    # ReActIdle (Blender-style 19-joint rig, metres): no toes, hands or second spine joint. SMPL-H
    # spine1 <- spine (pelvis to mid-back, 0.23 m) and spine3 <- spine.001 (mid-back to neck base),
    # which sit 0.23 m and 0.46 m above the pelvis like SMPL-H's spine3 (0.24 m) and neck (0.49 m);
    # spine2, the toes and the wrists get an identity local rotation. The pelvis is pelvis.L, not
    # pelvis: this rig rolls the pelvis through its hip bones pelvis.L/R (equal rotations; the thighs
    # sit exactly at their end sites), while the root joint itself only yaws. Its rest pose is a
    # T-pose facing +Z; the forearm End Sites stand in for the wrists when aligning the forearms.
    "reactidle": SkeletonVariant(
        name="reactidle",
        units_to_m=1.0,
        joint_map=(
            "pelvis.L",
            "thigh.L",
            "thigh.R",
            "spine",
            "shin.L",
            "shin.R",
            None,
            "foot.L",
            "foot.R",
            "spine.001",
            None,
            None,
            "neck",
            "shoulder.L",
            "shoulder.R",
            "face",
            "upper_arm.L",
            "upper_arm.R",
            "forearm.L",
            "forearm.R",
            None,
            None,
        ),
        wrist_tips=None,
        reference="rest",
        position_stand_ins=((20, "forearm.L_End"), (21, "forearm.R_End")),
        child_positions_include_offset=True,
    ),
}

# Bone-direction alignment, limbs only: SMPL-H joint -> the child whose rest direction is matched
# (wrists -> middle-finger base). The pelvis, spine, neck, head and collars keep A_j = I: both rigs
# stand upright facing +Z in their reference pose, and the directions of those bones depend on
# where each rig puts its joints (CMU's spine and collars start at the pelvis/spine centre), not on
# posture, so aligning them would tilt the converted torso. A limb joint whose child the rig lacks
# (ReActIdle's ankles: no toe joint, only a toe-tip End Site) keeps A_j = I too: both reference
# poses stand flat-footed.
_ALIGN_CHILD: dict[int, int] = {
    1: 4,
    2: 5,
    4: 7,
    5: 8,
    7: 10,
    8: 11,
    16: 18,
    17: 19,
    18: 20,
    19: 21,
    20: 25,
    21: 40,
}
# Segments measured on both skeletons for the betas fit (pairs of SMPL-H joints), averaged L/R. The
# torso and neck are left out: the CMU rigs' spine/neck markers are not anatomically comparable
# (pelvis to upper spine about 0.23 m), so fitting them would give converted bodies a stunted trunk.
SEGMENTS: dict[str, tuple[tuple[int, int], ...]] = {
    "hip_width": ((1, 2),),
    "thigh": ((1, 4), (2, 5)),
    "shin": ((4, 7), (5, 8)),
    "foot": ((7, 10), (8, 11)),
    "shoulder_width": ((16, 17),),
    "upper_arm": ((16, 18), (17, 19)),
    "forearm": ((18, 20), (19, 21)),
}
LEFT_TOE, RIGHT_TOE = 10, 11


def detect_variant(skeleton: BvhSkeleton) -> SkeletonVariant:
    """The variant whose mapped joints all exist in ``skeleton``; ValueError if none does."""
    for variant in VARIANTS.values():
        if all(n in skeleton.names for n in variant.bvh_joint_names()):
            return variant
    raise ValueError(
        f"BVH skeleton (root {skeleton.names[0]!r}, {len(skeleton.names)} joints) matches none of "
        f"the known rigs {list(VARIANTS)}; add a SkeletonVariant with its joint names."
    )


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


def clip_id(path: Path) -> str:
    """'001_01' for cmu_iclone clips; original-skeleton clips get '_orig' ('001_01_orig', '131_02_orig'),
    since CMU trial 1_1 exists on both rigs."""
    subject, trial = path.stem.split("_")
    suffix = "_orig" if path.parent.name == "cmu_original" else ""
    return f"{int(subject):03d}_{int(trial):02d}{suffix}"


# Held-out clips: at least one per subject and per activity group (walks, climbs, swordplay,
# uneven terrain, dance figures, basketball dribbles, the 131 walks). The same CMU trial on both
# rigs (001_01 / 001_01_orig) stays on one side.
TEST_CLIPS: tuple[str, ...] = (
    "001_14",
    "002_02",
    "002_08",
    "003_02",
    "005_01",
    "005_10",
    "005_19",
    "006_01",
    "006_05",
    "006_09",
    "007_02",
    "007_12",
    "131_02_orig",
)


def describe_clips(mocap_root: Path, clip_ids: list[str]) -> dict[str, str]:
    """Clip id -> CMU motion description from cmu_iclone/CMU_data.csv."""
    table: dict[tuple[int, int], str] = {}
    with open(mocap_root / "cmu_iclone" / "CMU_data.csv", newline="") as f:
        for row in csv.DictReader(f):
            table[(int(row["Subject"]), int(row["Trial #"]))] = row["Motion Description"].strip()
    out = {}
    for c in clip_ids:
        subject, trial = c.split("_")[:2]
        out[c] = table.get((int(subject), int(trial)), "")
    return out


# Post-training clips: carved out of the training clips so GRPO post-trains on motions the prior never
# saw (the prior trains on "train" minus these, split "prior_train"). One or more per activity group,
# chosen by hand; the test clips are unchanged so held-out numbers stay comparable.
POST_TRAIN_CLIPS: tuple[str, ...] = (
    "001_08",
    "002_05",
    "002_09",
    "003_01",
    "005_04",
    "005_08",
    "005_13",
    "005_17",
    "006_04",
    "006_08",
    "006_12",
    "007_05",
    "007_09",
    "131_03_orig",
)


def make_split(mocap_root: Path, clip_ids: list[str]) -> dict:
    """Fixed split by clip (listed in docs/ego_motion_data.md): train (of which post_train) and test."""
    unknown = [c for c in TEST_CLIPS + POST_TRAIN_CLIPS if c not in clip_ids]
    if unknown:
        raise ValueError(f"split clips {unknown} were not converted; fix TEST_CLIPS / POST_TRAIN_CLIPS or the mocap "
                         "folder.")
    return {
        "description": "CMU clips in the AMASS layout at 30 fps; split by clip, held-out clips cover every "
        "subject and activity group. post_train is a subset of train held out from the prior (prior_train = "
        "train minus post_train).",
        "train": [c for c in clip_ids if c not in TEST_CLIPS],
        "post_train": [c for c in clip_ids if c in POST_TRAIN_CLIPS],
        "test": [c for c in clip_ids if c in TEST_CLIPS],
        "clips": describe_clips(mocap_root, clip_ids),
    }


REACTIDLE_DEFAULT_OUT = Path("runs/reactidle_amass")
REACTIDLE_NOTICE = """# ReActIdle clips in the AMASS layout

Converted by `python -m tasks.ego_motion.data.convert --reactidle` (diffgrpo, tasks/ego_motion/data/convert.py):
each BVH clip of `reactidle/{acted,genuine}/` retargeted onto the body model (SMPL-H joint order,
rotation transfer, fitted betas, floor from the lowest toe joint) and resampled from 24 to 30 fps.
One `.npz` per clip, named after its BVH file (`001_acted.npz`; the number is the performer).

Source: the ReActIdle idle-motion dataset of "Evaluating Idle Animation Believability: a User
Perspective", Atxa Landa et al., 2025, arXiv 2509.05023. Cite it where these files are used.

Licence: MIT, full text in `LICENSE.txt` beside this file; it must travel with these files.

Content: people standing still, shifting weight, looking around; no locomotion, no hands (zero
hand pose), no toe or wrist motion (neutral local rotations).
"""


def convert_reactidle(mocap_root: Path, out: Path, body: BodyModel) -> dict[str, int]:
    """Convert every ReActIdle clip under ``mocap_root/reactidle`` into ``out`` (AMASS layout).

    Writes ``<clip>.npz`` per BVH file (clip = file stem), ``LICENSE.txt`` (the MIT licence, copied)
    and ``NOTICE.md`` (source and citation). Returns clip -> frames at 30 fps; unusable clips are
    logged and skipped, and if every clip is, raises ValueError.
    """
    source = mocap_root / "reactidle"
    files = sorted(source.rglob("*.bvh"))
    if not files or not (source / "LICENSE.txt").is_file():
        raise FileNotFoundError(
            f"expected ReActIdle BVH files and LICENSE.txt under {source}; pass --mocap-root (or set "
            "DIFFGRPO_MOCAP_ROOT) to the folder holding reactidle/."
        )
    out.mkdir(parents=True, exist_ok=True)
    frames: dict[str, int] = {}
    for path in files:
        try:
            seq = convert_bvh(path, body, mocap_root=mocap_root)
        except ValueError as err:
            logger.warning("skipped %s: %s", path, err)
            continue
        save_amass_npz(out / f"{path.stem}.npz", seq)
        frames[path.stem] = seq.num_frames
        logger.info("%s: %d frames", path.stem, seq.num_frames)
    if not frames:
        raise ValueError(f"none of the {len(files)} BVH files under {source} could be converted (see the log).")
    shutil.copyfile(source / "LICENSE.txt", out / "LICENSE.txt")  # contents only: the source may be read-only
    (out / "NOTICE.md").write_text(REACTIDLE_NOTICE)
    return frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mocap-root", type=Path, default=DEFAULT_MOCAP_ROOT)
    parser.add_argument(
        "--reactidle",
        action="store_true",
        help="convert the ReActIdle idle clips (MOCAP_ROOT/reactidle) instead of the CMU clips",
    )
    parser.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        type=Path,
        default=None,
        help=f"output folder (default {ASSETS / 'cmu'}; with --reactidle {REACTIDLE_DEFAULT_OUT}, not committed)",
    )
    parser.add_argument("--body-model", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    body = load_body_model(args.body_model, dtype=torch.float64)
    if args.reactidle:
        out = args.out or REACTIDLE_DEFAULT_OUT
        frames = convert_reactidle(args.mocap_root, out, body)
        logger.info("wrote %d ReActIdle clips, %d frames (%.1f min at %g fps) to %s", len(frames),
                    sum(frames.values()), sum(frames.values()) / TARGET_FPS / 60, TARGET_FPS, out)
        return
    args.out = args.out or ASSETS / "cmu"
    files = sorted(args.mocap_root.glob("cmu_iclone/*/*.bvh")) + sorted(
        args.mocap_root.glob("cmu_original/*.bvh")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            seq = convert_bvh(path, body, mocap_root=args.mocap_root)
        except ValueError as err:
            logger.warning("skipped %s: %s", path, err)
            continue
        save_amass_npz(args.out / f"{clip_id(path)}.npz", seq)
        logger.info("%s: %d frames", clip_id(path), seq.num_frames)
    shutil.copy(args.mocap_root / "NOTICE.md", args.out / "NOTICE.md")
    split = make_split(args.mocap_root, sorted(p.stem for p in args.out.glob("*.npz")))
    (args.out.parent / "split.json").write_text(json.dumps(split, indent=2) + "\n")


if __name__ == "__main__":
    main()
