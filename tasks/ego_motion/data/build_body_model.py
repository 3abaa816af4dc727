"""Build the bundled, openly licensed SMPL-H stand-in ``assets/smplh_cmu_skeleton.npz``.

Why: the real SMPL-H is licensed and cannot ship. This is a skeleton-level model in the same
``.npz`` layout (keys that ``smplx.SMPLH`` reads), so real AMASS data and our converted CMU data go
through one loader. What it contains (docs/ego_motion_data.md has the full account):

- Rest pose: SMPL conventions (+Y up, facing +Z, left on +X), a T-pose taken from the CC rig's
  T-pose (frame 0 of cmu_iclone/007/007_03.bvh, same rig for all iclone clips), mirrored-averaged
  so it is exactly left/right symmetric, scaled to a stature of 1.70 m (stature = eye height /
  0.936). Origin: x = 0 on the symmetry plane, z = 0 at the pelvis, y = 0 at half the stature.
- Fingers: fixed anatomical offsets (no finger capture), palm down, fingers along +-X.
- Mesh: vertices = the 52 joints + 7 markers (eyes, head top, toe tips, heels on the sole);
  J_regressor selects the joints; each vertex is skinned one-hot to its joint (markers to the
  joint they hang off); no pose blend shapes; faces join each joint to its parent and grandparent.
- Shape space (16 betas, each unit beta = one standard deviation): first the principal components
  of log segment lengths across the three measured skeletons (CC rig, CMU subject 01, CMU subject
  131), then documented proportion modes added greedily while they increase the rank (see
  ``PROPORTION_MODES``); the chosen names are stored in ``shape_mode_names``. Every mode is
  symmetric, so mirroring stays exact for any betas.
- CPF: ``cpf_offset_head`` = eye midpoint minus head joint from the CC rig's eye joints (scaled).

Run ``python -m tasks.ego_motion.data.build_body_model`` (deterministic; a test rebuilds and compares).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from ..body.geometry import NUM_BETAS, SMPLH_MIRROR_PERMUTATION, SMPLH_PARENTS
from .bvh import parse_bvh
from .retarget import DEFAULT_MOCAP_ROOT, reference_pose, segment_lengths
from .skeletons import SEGMENTS, VARIANTS

logger = logging.getLogger(__name__)

OUTPUT = Path(__file__).resolve().parents[1] / "assets" / "smplh_cmu_skeleton.npz"
STATURE_M = 1.70
EYE_HEIGHT_FRACTION = 0.936
SUBJECT_CLIPS = ("cmu_iclone/007/007_03.bvh", "cmu_original/01_01.bvh", "cmu_original/131_01.bvh")
# Finger joints relative to their parent, left hand, metres, T-pose (palm down, fingers along +X,
# body facing +Z). Order per finger: base (MCP, from the wrist), middle (PIP), tip-side (DIP).
LEFT_FINGERS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "index": ((0.088, 0.004, 0.026), (0.038, 0.0, 0.002), (0.024, -0.002, 0.0)),
    "middle": ((0.092, 0.005, 0.004), (0.042, 0.0, 0.0), (0.027, -0.002, 0.0)),
    "pinky": ((0.078, 0.0, -0.036), (0.030, -0.001, -0.004), (0.020, -0.002, -0.002)),
    "ring": ((0.086, 0.003, -0.016), (0.039, 0.0, -0.002), (0.025, -0.002, 0.0)),
    "thumb": ((0.024, -0.012, 0.026), (0.030, -0.006, 0.022), (0.027, -0.004, 0.012)),
}
FINGER_ORDER = ("index", "middle", "pinky", "ring", "thumb")  # SMPL-H hand joint order
# Bones (child joint index, offset from its parent) scaled by each PCA segment.
SEGMENT_BONES: dict[str, tuple[int, ...]] = {
    "hip_width": (1, 2),
    "thigh": (4, 5),
    "shin": (7, 8),
    "foot": (10, 11),
    "trunk": (3, 6, 9, 12),
    "neck_head": (15,),
    "shoulder_width": (13, 14, 16, 17),
    "upper_arm": (18, 19),
    "forearm": (20, 21),
}
FINGER_BONES = tuple(range(22, 52))
# Candidate proportion modes, in order: (name, {bone: relative scale}, std) for bone scalings, or
# (name, {bone: (dx, dy, dz) metres}, 1.0) for offset changes. Stds are anthropometric guesses.
PROPORTION_MODES: tuple[tuple[str, dict, float], ...] = (
    ("stature", {j: 1.0 for j in range(1, 52)}, 0.04),
    ("leg_length", {4: 1.0, 5: 1.0, 7: 1.0, 8: 1.0}, 0.03),
    ("trunk_length", {3: 1.0, 6: 1.0, 9: 1.0, 12: 1.0}, 0.04),
    ("arm_length", {18: 1.0, 19: 1.0, 20: 1.0, 21: 1.0}, 0.03),
    ("shoulder_width", {13: 1.0, 14: 1.0, 16: 1.0, 17: 1.0}, 0.05),
    ("hip_width", {1: 1.0, 2: 1.0}, 0.06),
    ("head_neck", {15: 1.0}, 0.06),
    ("thigh_vs_shin", {4: 1.0, 5: 1.0, 7: -1.0, 8: -1.0}, 0.03),
    ("upper_vs_forearm", {18: 1.0, 19: 1.0, 20: -1.0, 21: -1.0}, 0.03),
    ("foot_length", {10: 1.0, 11: 1.0}, 0.06),
    ("hand_size", {j: 1.0 for j in FINGER_BONES}, 0.06),
    ("lumbar_vs_thoracic", {3: 1.0, 9: -1.0}, 0.08),
    ("collar_length", {13: 1.0, 14: 1.0}, 0.08),
    ("lower_neck", {12: 1.0}, 0.08),
    ("forward_head", {15: (0.0, 0.0, 0.015)}, 1.0),
    ("pelvis_height", {1: (0.0, -0.012, 0.0), 2: (0.0, -0.012, 0.0)}, 1.0),
    ("shoulder_height", {16: (0.0, 0.012, 0.0), 17: (0.0, 0.012, 0.0)}, 1.0),
)
# Extra mesh vertices: (name, joint, offset builder) -- offsets filled in from the rest skeleton.
MARKERS = ("right_eye", "left_eye", "head_top", "left_toe_tip", "right_toe_tip", "left_heel", "right_heel")
MARKER_JOINTS = (15, 15, 15, 10, 11, 7, 8)
_MIRROR = np.array([-1.0, 1.0, 1.0])


def _symmetrise(points: np.ndarray, perm: list[int]) -> np.ndarray:
    """Average each point with the mirror image of its counterpart (x -> -x)."""
    return 0.5 * (points + points[perm] * _MIRROR)


def _rest_skeleton(mocap_root: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """52 rest joints (model frame, metres), 7 marker positions, and the sole height (y)."""
    path = mocap_root / SUBJECT_CLIPS[0]
    motion = parse_bvh(path)
    variant = VARIANTS["cc_iclone"]
    ref = reference_pose(motion, variant, mocap_root)
    sk = motion.skeleton
    from ..data.bvh import global_poses

    g = global_poses(motion, slice(0, 1))
    eyes = g.t_world_joint[0, [sk.index("CC_Base_R_Eye"), sk.index("CC_Base_L_Eye")]] * variant.units_to_m
    body = ref.t_bvh_joint_m.copy()  # (22, 3); BVH floor at y = 0
    centre = np.array([body[0, 0], 0.0, body[0, 2]])
    body, eyes = body - centre, eyes - centre
    body = _symmetrise(body, list(SMPLH_MIRROR_PERMUTATION[:22]))
    eyes = 0.5 * (eyes + eyes[[1, 0]] * _MIRROR)
    scale = STATURE_M * EYE_HEIGHT_FRACTION / eyes[:, 1].mean()
    body, eyes = body * scale, eyes * scale
    joints = np.zeros((52, 3))
    joints[:22] = body
    for side, wrist, first in (("left", 20, 22), ("right", 21, 37)):
        sign = np.array([1.0 if side == "left" else -1.0, 1.0, 1.0])
        for f, finger in enumerate(FINGER_ORDER):
            parent = wrist
            for k, off in enumerate(LEFT_FINGERS[finger]):
                j = first + 3 * f + k
                assert SMPLH_PARENTS[j] == parent
                joints[j] = joints[parent] + sign * np.array(off)
                parent = j
    head, toes, ankles = joints[15], joints[[10, 11]], joints[[7, 8]]
    markers = np.stack(
        [
            eyes[0],
            eyes[1],
            head + np.array([0.0, STATURE_M - head[1], 0.0]),
            toes[0] + np.array([0.0, -toes[0, 1], 0.05]),
            toes[1] + np.array([0.0, -toes[1, 1], 0.05]),
            ankles[0] + np.array([0.0, -ankles[0, 1], -0.06]),
            ankles[1] + np.array([0.0, -ankles[1, 1], -0.06]),
        ]
    )
    shift = np.array([0.0, STATURE_M / 2, 0.0])
    return joints - shift, markers - shift, -STATURE_M / 2


def _measured_lengths(mocap_root: Path) -> np.ndarray:
    """(subjects, segments) segment lengths in metres from each rig's reference pose."""
    rows = []
    for clip in SUBJECT_CLIPS:
        motion = parse_bvh(mocap_root / clip)
        variant = next(v for v in VARIANTS.values() if all(n in motion.skeleton.names for n in v.joint_map))
        ref = reference_pose(motion, variant, mocap_root)
        lens = segment_lengths(ref.t_bvh_joint_m)
        rows.append([float(lens[k]) for k in SEGMENTS])
    return np.array(rows)


def _bone_mode(joints: np.ndarray, spec: dict) -> np.ndarray:
    """Joint displacements (52, 3) of a mode that scales bones or shifts bone offsets."""
    delta_bone = np.zeros((52, 3))
    for j, v in spec.items():
        offset = joints[j] - joints[SMPLH_PARENTS[j]]
        delta_bone[j] = offset * v if np.isscalar(v) else np.array(v)
    out = np.zeros((52, 3))
    for j in range(1, 52):  # parents precede children
        out[j] = out[SMPLH_PARENTS[j]] + delta_bone[j]
    return out


def build(mocap_root: Path = DEFAULT_MOCAP_ROOT) -> dict[str, np.ndarray]:
    """All arrays of the bundled model (float64 geometry)."""
    joints, markers, _ = _rest_skeleton(mocap_root)
    lengths = _measured_lengths(mocap_root)
    logs = np.log(lengths)
    centred = logs - logs.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    n_pca = int((sv > 1e-6).sum())
    modes, names = [], []
    for k in range(n_pca):
        comp = vt[k] * np.sign(vt[k][np.argmax(np.abs(vt[k]))])
        std = sv[k] / np.sqrt(len(lengths) - 1)
        spec = {b: std * c for seg, c in zip(SEGMENTS, comp, strict=False) for b in SEGMENT_BONES[seg]}
        modes.append(_bone_mode(joints, spec))
        names.append(f"subject_pca_{k}")
    for name, spec, std in PROPORTION_MODES:
        if len(modes) == NUM_BETAS:
            break
        scaled = {j: (v * std if np.isscalar(v) else v) for j, v in spec.items()}
        cand = _bone_mode(joints, scaled)
        stack = np.stack([m.reshape(-1) for m in modes + [cand]], 1)
        if np.linalg.matrix_rank(stack, tol=1e-9) == len(modes) + 1:
            modes.append(cand)
            names.append(name)
    if len(modes) != NUM_BETAS:
        raise RuntimeError(f"only {len(modes)} independent shape modes; add candidates to PROPORTION_MODES.")
    J_shapedirs = np.stack(modes, -1)  # (52, 3, 16)
    marker_dirs = J_shapedirs[list(MARKER_JOINTS)]
    v_template = np.concatenate([joints, markers], 0)
    V = v_template.shape[0]
    shapedirs = np.concatenate([J_shapedirs, marker_dirs], 0)
    weights = np.zeros((V, 52))
    weights[np.arange(52), np.arange(52)] = 1.0
    weights[np.arange(52, V), list(MARKER_JOINTS)] = 1.0
    J_regressor = np.zeros((52, V))
    J_regressor[np.arange(52), np.arange(52)] = 1.0
    faces = np.array(
        [[SMPLH_PARENTS[SMPLH_PARENTS[j]], SMPLH_PARENTS[j], j] for j in range(52) if SMPLH_PARENTS[j] > 0],
        dtype=np.int64,
    )
    kintree = np.stack([np.array([4294967295, *SMPLH_PARENTS[1:]], dtype=np.int64), np.arange(52)])
    cpf = markers[:2].mean(0) - joints[15]
    cpf[0] = 0.0
    return {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": np.zeros((V, 3, 51 * 9)),
        "J_regressor": J_regressor,
        "weights": weights,
        "kintree_table": kintree,
        "f": faces,
        "hands_componentsl": np.eye(45),
        "hands_componentsr": np.eye(45),
        "hands_meanl": np.zeros(45),
        "hands_meanr": np.zeros(45),
        "cpf_offset_head": cpf,
        "shape_mode_names": np.array(names),
        "marker_names": np.array(MARKERS),
        "subject_segment_lengths_m": lengths,
        "segment_names": np.array(list(SEGMENTS)),
    }


def write_synthetic_smplh_npz(
    path: Path,
    *,
    num_vertices: int = 6890,
    num_betas: int = 16,
    seed: int = 0,
    include_hand_pca: bool = False,
) -> Path:
    """Write a random but valid SMPL-H-format ``.npz`` of the real size (tests and benchmarks only).

    Shapes match the MANO-site 'Extended SMPL+H' file: v_template (V, 3), shapedirs (V, 3, B),
    posedirs (V, 3, 459), J_regressor (52, V) with convex rows, weights (V, 52) with convex rows
    over 4 joints, faces (2V, 3); no hand-PCA keys unless ``include_hand_pca``. The geometry is
    noise: use it to exercise code paths and timing, never as a body.
    """
    rng = np.random.default_rng(seed)
    V = num_vertices
    v_template = rng.normal(scale=0.3, size=(V, 3))
    J_regressor = np.zeros((52, V))
    for j in range(52):
        cols = rng.choice(V, size=20, replace=False)
        w = rng.random(20)
        J_regressor[j, cols] = w / w.sum()
    weights = np.zeros((V, 52))
    for v in range(V):
        cols = rng.choice(52, size=4, replace=False)
        w = rng.random(4)
        weights[v, cols] = w / w.sum()
    arrays = {
        "v_template": v_template,
        "shapedirs": rng.normal(scale=0.01, size=(V, 3, num_betas)),
        "posedirs": rng.normal(scale=0.001, size=(V, 3, 51 * 9)),
        "J_regressor": J_regressor,
        "weights": weights,
        "kintree_table": np.stack(
            [np.array([4294967295, *SMPLH_PARENTS[1:]], dtype=np.int64), np.arange(52)]
        ),
        "f": rng.integers(0, V, size=(2 * V, 3)),
    }
    if include_hand_pca:
        arrays.update(
            hands_componentsl=np.eye(45),
            hands_componentsr=np.eye(45),
            hands_meanl=np.zeros(45),
            hands_meanr=np.zeros(45),
        )
    np.savez(path, **arrays)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the bundled skeleton-level SMPL-H stand-in.")
    parser.add_argument("--mocap-root", type=Path, default=DEFAULT_MOCAP_ROOT)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    arrays = build(args.mocap_root)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    logger.info(
        "wrote %s: shape modes %s, cpf_offset_head %s m",
        args.output,
        list(arrays["shape_mode_names"]),
        np.round(arrays["cpf_offset_head"], 4).tolist(),
    )


if __name__ == "__main__":
    main()
