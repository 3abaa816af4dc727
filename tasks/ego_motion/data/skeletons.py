"""The BVH skeleton tables of the retargeting: which BVH joint drives which SMPL-H body joint, per rig.

Why a module of tables: each rig the CMU and ReActIdle clips come in (the Reallusion CC rig of
``cmu_iclone``, the original CMU skeleton, the ReActIdle Blender rig) names its joints differently,
has its own reference (T-)pose and its own stand-ins for joints it lacks; ``SkeletonVariant`` holds
one rig's answers and ``VARIANTS`` all of them, with the segment table the betas fit reads
(``SEGMENTS``) and the limb children that fix each bone's direction (``_ALIGN_CHILD``). The
retargeting itself is ``retarget.py``; the command line ``convert.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bvh import BvhSkeleton

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
