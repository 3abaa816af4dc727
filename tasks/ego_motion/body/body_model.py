"""SMPL-H body model through ``smplx``, with a fast joints-only forward kinematics.

Why: the diffusion prior, the rewards and the metrics need world joint positions for thousands
of frames per step, and the root pose is never predicted but recovered from the head (CPF)
pose by kinematics (docs/ego_motion_data.md). A full ``smplx`` forward skins a 6,890-vertex mesh;
the joints alone follow from a per-joint linear shape model and a 52-joint kinematic chain.
This module loads any SMPL-H ``.npz`` (the licensed neutral model with 16 betas, or the
bundled skeleton-level stand-in) through ``smplx``, precomputes

    J(betas) = J_template + J_shapedirs @ betas        J_template (52, 3), J_shapedirs (52, 3, B)

(``J_regressor`` applied to ``v_template`` and ``shapedirs``; exact, since both are linear), and
never touches the mesh again on hot paths.

Frames and conventions:
- model frame: SMPL's canonical rest frame, +Y up, body facing +Z, the body's left on +X.
- ``T_world_root``: pose of the pelvis joint frame in the world (rotation = global orientation,
  translation = pelvis position). AMASS stores ``trans`` such that the pelvis world position is
  ``trans + J_0(betas)`` (smplx keeps the root joint at J_0 and adds ``transl`` afterwards), so
  ``T_world_root = [R(root_orient) | trans + J_0(betas)]``.
- ``T_root_joint``: joint pose relative to the pelvis frame (FK with identity root).
- CPF (central pupil frame): ``T_head_cpf`` has identity rotation and a translation from the head
  joint to the midpoint between the eyes in the zero pose; its +Z looks forward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import smplx
import torch
from jaxtyping import Float
from smplx.utils import Struct
from torch import Tensor

from .geometry import (
    HEAD_JOINT,
    NUM_BODY_JOINTS,
    NUM_HAND_JOINTS,
    SMPLH_MIRROR_PERMUTATION,
    SMPLH_PARENTS,
    invert_transform,
    make_transform,
)

logger = logging.getLogger(__name__)

NUM_JOINTS = 52
SMPLH_NUM_VERTICES = 6890
# Eye vertices of the real SMPL-H mesh (right eye 6260/6262, left eye 2800/2802); the CPF is
# their mean, following EgoAllo's convention.
SMPLH_EYE_VERTEX_IDS: tuple[int, ...] = (6260, 6262, 2800, 2802)
REQUIRED_KEYS: tuple[str, ...] = (
    "v_template",
    "shapedirs",
    "posedirs",
    "J_regressor",
    "weights",
    "kintree_table",
    "f",
)
CPF_OFFSET_KEY = "cpf_offset_head"
ENV_BODY_MODEL_PATH = "DIFFGRPO_SMPLH_PATH"
BUNDLED_BODY_MODEL = Path(__file__).resolve().parents[1] / "assets" / "smplh_cmu_skeleton.npz"
SMPLH_DOWNLOAD_HINT = (
    "The real SMPL-H comes from https://mano.is.tue.mpg.de ('Extended SMPL+H model', file "
    "smplh/neutral/model.npz, licence required). The open skeleton-level stand-in ships at "
    f"{BUNDLED_BODY_MODEL} (rebuild it with `python -m tasks.ego_motion.data.build_body_model`)."
)

_HEAD_CHAIN: tuple[int, ...] = (3, 6, 9, 12, HEAD_JOINT)  # spine1 .. head, each the parent's child


def default_body_model_path() -> Path:
    """The body model used when none is given: ``$DIFFGRPO_SMPLH_PATH`` if set, else the bundled one."""
    env = os.environ.get(ENV_BODY_MODEL_PATH)
    return Path(env).expanduser() if env else BUNDLED_BODY_MODEL


@dataclass(frozen=True)
class JointPoses:
    """World (or root-relative) joint frames from forward kinematics.

    R_world_joint: (..., 52, 3, 3) global joint rotations.
    t_world_joint: (..., 52, 3) joint positions in metres.
    """

    R_world_joint: Tensor
    t_world_joint: Tensor

    @property
    def T_world_joint(self) -> Tensor:
        """(..., 52, 4, 4) homogeneous joint transforms."""
        return make_transform(self.R_world_joint, self.t_world_joint)


def _read_model_file(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise FileNotFoundError(
            f"SMPL-H body model not found at {path}. {SMPLH_DOWNLOAD_HINT} "
            f"Point ${ENV_BODY_MODEL_PATH} or the `path` argument at the file."
        )
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise KeyError(
            f"{path} is not an SMPL-H .npz: missing keys {missing} (has {sorted(data)}). "
            f"Expected the keys of the 'Extended SMPL+H model' npz: {list(REQUIRED_KEYS)}."
        )
    parents = tuple(int(p) for p in data["kintree_table"][0][1:])
    if data["J_regressor"].shape[0] != NUM_JOINTS or parents != SMPLH_PARENTS[1:]:
        raise ValueError(
            f"{path}: kinematic tree with {data['J_regressor'].shape[0]} joints does not "
            f"match SMPL-H's 52-joint tree; is this an SMPL or SMPL-X file instead of SMPL-H?"
        )
    return data


def _smplx_layer(data: dict[str, np.ndarray], path: Path, dtype: torch.dtype) -> smplx.SMPLH:
    """Build ``smplx.SMPLH`` keeping every beta in the file and tolerating non-6890-vertex meshes.

    smplx caps betas at 10 unless the file has SHAPE_SPACE_DIM (300) of them, so the subclass
    sets SHAPE_SPACE_DIM to the file's count. Its extra "vertex joints" (nose, eyes, toes,
    fingertips) index the 6,890-vertex mesh; for any other mesh they all point at vertex 0 and
    are dropped (only the 52 skeleton joints are ever used). The MANO-site npz has no hand PCA
    keys; with ``use_pca=False, flat_hand_mean=True`` smplx never uses them, so absent ones are
    given zeros of the usual shape.
    """
    num_betas = int(data["shapedirs"].shape[-1])
    layer_cls = type("SMPLHAllBetas", (smplx.SMPLH,), {"SHAPE_SPACE_DIM": num_betas})
    fields = dict(data)
    for side in ("l", "r"):
        fields.setdefault(f"hands_components{side}", np.zeros((45, 45)))
        fields.setdefault(f"hands_mean{side}", np.zeros(45))
    kwargs: dict = {}
    if data["v_template"].shape[0] != SMPLH_NUM_VERTICES:
        names = smplx.vertex_ids.vertex_ids["smplh"].keys()
        kwargs = dict(vertex_ids={name: 0 for name in names}, use_feet_keypoints=False, use_hands=False)
    return layer_cls(
        model_path=str(path),
        data_struct=Struct(**fields),
        num_betas=num_betas,
        use_pca=False,
        flat_hand_mean=True,
        gender="neutral",
        dtype=dtype,
        batch_size=1,
        **kwargs,
    )


class BodyModel(torch.nn.Module):
    """SMPL-H joints, FK and CPF kinematics; buffers move with ``.to(device)``.

    Build with :func:`load_body_model`. ``self.smplx_layer`` is the full ``smplx.SMPLH`` (mesh,
    used for parity checks and rendering); everything else uses the 52-joint buffers.
    """

    def __init__(self, layer: smplx.SMPLH, cpf_offset_head: np.ndarray | None, source: Path):
        super().__init__()
        self.smplx_layer = layer
        self.source = source
        self.num_betas = int(layer.num_betas)
        self.parents: tuple[int, ...] = SMPLH_PARENTS
        dtype = layer.v_template.dtype
        with torch.no_grad():
            reg = layer.J_regressor  # (52, V)
            J_template = reg @ layer.v_template  # (52, 3)
            J_shapedirs = torch.einsum("jv,vcb->jcb", reg, layer.shapedirs)  # (52, 3, B)
            if cpf_offset_head is None:
                eyes = list(SMPLH_EYE_VERTEX_IDS)
                cpf_template = layer.v_template[eyes].mean(0) - J_template[HEAD_JOINT]
                cpf_shapedirs = layer.shapedirs[eyes].mean(0) - J_shapedirs[HEAD_JOINT]  # (3, B)
            else:
                cpf_template = torch.as_tensor(cpf_offset_head, dtype=dtype).reshape(3)
                cpf_shapedirs = torch.zeros(3, self.num_betas, dtype=dtype)
        self.register_buffer("J_template", J_template.clone())
        self.register_buffer("J_shapedirs", J_shapedirs.clone())
        self.register_buffer("cpf_template", cpf_template.clone())
        self.register_buffer("cpf_shapedirs", cpf_shapedirs.clone())
        self.register_buffer("parents_tensor", torch.tensor(SMPLH_PARENTS, dtype=torch.long))

    # ---------------------------------------------------------------- shape
    def _check_betas(self, betas: Tensor) -> None:
        if betas.shape[-1] != self.num_betas:
            raise ValueError(
                f"got betas with {betas.shape[-1]} coefficients, this body model ({self.source}) "
                f"has {self.num_betas}; pad or truncate the betas to {self.num_betas}."
            )

    def shaped_joints(self, betas: Tensor) -> Tensor:
        """Rest (zero-pose) joint positions in the model frame, metres: (..., B) -> (..., 52, 3)."""
        self._check_betas(betas)
        return self.J_template + torch.einsum("jcb,...b->...jc", self.J_shapedirs, betas.to(self.J_template))

    def T_head_cpf(self, betas: Tensor | None = None) -> Tensor:
        """CPF relative to the head joint: identity rotation, eye midpoint offset. (..., B) -> (..., 4, 4)."""
        if betas is None:
            t = self.cpf_template
        else:
            self._check_betas(betas)
            t = self.cpf_template + torch.einsum(
                "cb,...b->...c", self.cpf_shapedirs, betas.to(self.cpf_template)
            )
        eye = torch.eye(3, dtype=t.dtype, device=t.device).expand(*t.shape[:-1], 3, 3)
        return make_transform(eye, t)

    # ---------------------------------------------------------------- kinematics
    def _joints(self, betas: Tensor | None, shaped_joints: Tensor | None) -> Tensor:
        if (betas is None) == (shaped_joints is None):
            raise ValueError("pass exactly one of betas=(..., B) or shaped_joints=(..., 52, 3).")
        if shaped_joints is None:
            return self.shaped_joints(betas)
        if shaped_joints.shape[-2:] != (NUM_JOINTS, 3):
            raise ValueError(f"shaped_joints must be (..., 52, 3), got {tuple(shaped_joints.shape)}.")
        return shaped_joints

    def _full_rotmats(self, local_rotmats: Tensor) -> Tensor:
        n = local_rotmats.shape[-3]
        if local_rotmats.shape[-2:] != (3, 3) or n not in (
            NUM_BODY_JOINTS,
            NUM_BODY_JOINTS + NUM_HAND_JOINTS,
        ):
            raise ValueError(
                f"local_rotmats must be (..., 21, 3, 3) (body) or (..., 51, 3, 3) (body + hands), "
                f"got {tuple(local_rotmats.shape)}."
            )
        if n == NUM_BODY_JOINTS:  # zero-pose (identity) hands
            eye = torch.eye(3, dtype=local_rotmats.dtype, device=local_rotmats.device)
            hands = eye.expand(*local_rotmats.shape[:-3], NUM_HAND_JOINTS, 3, 3)
            local_rotmats = torch.cat([local_rotmats, hands], dim=-3)
        return local_rotmats

    def forward_kinematics(
        self,
        local_rotmats: Tensor,
        *,
        betas: Tensor | None = None,
        shaped_joints: Tensor | None = None,
        T_world_root: Tensor | None = None,
    ) -> JointPoses:
        """Joint frames from local rotations, without the mesh.

        local_rotmats: (..., 51, 3, 3) rotations of joints 1..51 relative to their parents
            (body 21 + hands 30), or (..., 21, 3, 3) body only with identity hands.
        betas (..., B) or shaped_joints (..., 52, 3): the body shape (exactly one).
        T_world_root: (..., 4, 4) pelvis pose in the world; identity (pelvis at the origin) if None.
        Returns JointPoses with (..., 52, 3, 3) rotations and (..., 52, 3) positions; equal to
        smplx's joints when T_world_root = [R_root | transl + J_0].
        Equation: R_j = R_parent L_j, t_j = t_parent + R_parent (J_j - J_parent).
        """
        L = self._full_rotmats(local_rotmats)
        J = self._joints(betas, shaped_joints).to(L)
        offsets = J - J[..., list((0, *SMPLH_PARENTS[1:])), :]  # (..., 52, 3); row 0 unused
        batch = torch.broadcast_shapes(
            L.shape[:-3], J.shape[:-2], () if T_world_root is None else T_world_root.shape[:-2]
        )
        if T_world_root is None:
            R0 = torch.eye(3, dtype=L.dtype, device=L.device).expand(*batch, 3, 3)
            t0 = torch.zeros(*batch, 3, dtype=L.dtype, device=L.device)
        else:
            R0 = T_world_root[..., :3, :3].to(L).expand(*batch, 3, 3).contiguous()
            t0 = T_world_root[..., :3, 3].to(L).expand(*batch, 3).contiguous()
        L = L.expand(*batch, NUM_JOINTS - 1, 3, 3)
        offsets = offsets.expand(*batch, NUM_JOINTS, 3)
        # One joint at a time in tree order (parents first). Per-level batching was tried: gathering
        # and splitting levels leaves oddly strided views that make CPU matmuls ~20x slower.
        R: list[Tensor] = [R0]
        t: list[Tensor] = [t0]
        for j in range(1, NUM_JOINTS):
            p = SMPLH_PARENTS[j]
            R.append(R[p] @ L[..., j - 1, :, :])
            t.append(t[p] + (R[p] @ offsets[..., j, :, None])[..., 0])
        return JointPoses(R_world_joint=torch.stack(R, dim=-3), t_world_joint=torch.stack(t, dim=-2))

    def T_root_head(self, body_rotmats: Tensor, betas: Tensor) -> Tensor:
        """Head joint pose in the pelvis frame (identity root): (..., 21|51, 3, 3), (..., B) -> (..., 4, 4).

        Only the pelvis-to-head chain (spine1, spine2, spine3, neck, head) is evaluated.
        """
        if body_rotmats.shape[-3] < NUM_BODY_JOINTS or body_rotmats.shape[-2:] != (3, 3):
            raise ValueError(f"body_rotmats must be (..., 21 or 51, 3, 3), got {tuple(body_rotmats.shape)}.")
        J = self.shaped_joints(betas).to(body_rotmats)
        R = None
        t = None
        prev = 0
        for j in _HEAD_CHAIN:
            offset = J[..., j, :] - J[..., prev, :]
            t = offset if t is None else t + (R @ offset[..., None])[..., 0]
            L = body_rotmats[..., j - 1, :, :]
            R = L if R is None else R @ L
            prev = j
        batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
        return make_transform(R.expand(*batch, 3, 3), t.expand(*batch, 3))

    def T_world_cpf_from_root(self, T_world_root: Tensor, body_rotmats: Tensor, betas: Tensor) -> Tensor:
        """Headset pose from the body, (..., 4, 4): T_world_cpf = T_world_root @ T_root_head @ T_head_cpf."""
        return T_world_root @ self.T_root_head(body_rotmats, betas) @ self.T_head_cpf(betas)

    def root_from_cpf(self, T_world_cpf: Tensor, body_rotmats: Tensor, betas: Tensor) -> Tensor:
        """Recover the pelvis pose from the headset (docs/ego_motion_data.md). -> (..., 4, 4).

        T_world_root = T_world_cpf @ inv(T_head_cpf) @ inv(T_root_head).
        """
        return (
            T_world_cpf
            @ invert_transform(self.T_head_cpf(betas))
            @ invert_transform(self.T_root_head(body_rotmats, betas))
        )

    def T_world_root_from_amass(self, root_orient_rotmat: Tensor, trans: Tensor, betas: Tensor) -> Tensor:
        """AMASS (root_orient (..., 3, 3), trans (..., 3)) -> pelvis pose [R | trans + J_0(betas)]."""
        return make_transform(root_orient_rotmat, trans + self.shaped_joints(betas)[..., 0, :])

    def amass_trans_from_root(self, T_world_root: Tensor, betas: Tensor) -> Tensor:
        """Inverse of :meth:`T_world_root_from_amass` for the translation: trans = t_pelvis - J_0(betas)."""
        return T_world_root[..., :3, 3] - self.shaped_joints(betas)[..., 0, :]


def load_body_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BodyModel:
    """Load an SMPL-H ``.npz`` (real or bundled) as a :class:`BodyModel`.

    path: file to load; default :func:`default_body_model_path` ($DIFFGRPO_SMPLH_PATH or bundled).
    The bundled skeleton model carries its CPF offset in the ``cpf_offset_head`` key (metres, model
    frame); a 6,890-vertex mesh derives it from the eye vertices, linear in betas.
    """
    path = Path(path).expanduser() if path is not None else default_body_model_path()
    data = _read_model_file(path)
    layer = _smplx_layer(data, path, dtype)
    cpf = data.get(CPF_OFFSET_KEY)
    if cpf is None and data["v_template"].shape[0] != SMPLH_NUM_VERTICES:
        raise KeyError(
            f"{path}: a {data['v_template'].shape[0]}-vertex model needs a '{CPF_OFFSET_KEY}' key "
            f"(3,) with the eye midpoint relative to the head joint; only the 6,890-vertex SMPL-H "
            f"mesh has known eye vertices."
        )
    logger.debug(
        "loaded SMPL-H body model %s (%d vertices, %d betas)",
        path,
        data["v_template"].shape[0],
        layer.num_betas,
    )
    return BodyModel(layer, cpf, path).to(device)


# ---------------------------------------------------------------- mirroring
# Left/right mirroring reflects the world across its X = 0 plane (Z stays up) and the body's
# model frame across its X = 0 plane (the body's left-right axis): M = diag(-1, 1, 1) in both.
_MIRROR = (-1.0, 1.0, 1.0)


def _mirror_matrix(like: Tensor) -> Tensor:
    return torch.diag(torch.tensor(_MIRROR, dtype=like.dtype, device=like.device))


def mirror_local_rotations(local_rotmats: Tensor) -> Tensor:
    """Left/right mirrored local rotations: R'_j = M R_{perm(j)} M. (..., 21 or 51, 3, 3) -> same.

    Exact when the rest skeleton is symmetric (M J_{perm(j)} = J_j relative to the pelvis), as the
    bundled model is; approximately so for the real SMPL-H.
    """
    n = local_rotmats.shape[-3]
    perm = [SMPLH_MIRROR_PERMUTATION[j] - 1 for j in range(1, n + 1)]
    M = _mirror_matrix(local_rotmats)
    return M @ local_rotmats[..., perm, :, :] @ M


def mirror_root_pose(T_world_root: Tensor) -> Tensor:
    """Mirrored pelvis pose: R' = M R M, t' = M t (world and model reflected across X = 0). (..., 4, 4)."""
    M = _mirror_matrix(T_world_root)
    return make_transform(M @ T_world_root[..., :3, :3] @ M, (M @ T_world_root[..., :3, 3:4])[..., 0])


def mirror_joint_positions(t_world_joint: Tensor) -> Tensor:
    """Mirrored world joint positions: p'_j = M p_{perm(j)}. (..., 52, 3) -> (..., 52, 3)."""
    return t_world_joint[..., list(SMPLH_MIRROR_PERMUTATION), :] * torch.tensor(_MIRROR).to(t_world_joint)


def pose_from_head(
    body: BodyModel,
    T_world_cpf: Float[Tensor, "*lead T 4 4"],
    body_rotmats: Float[Tensor, "*lead T 21 3 3"],
    betas: Float[Tensor, "*lead nb"],
    hand_rotmats: Float[Tensor, "*lead T 30 3 3"] | None = None,
) -> dict[str, Tensor]:
    """Root from the head, then forward kinematics: the body of local rotations worn under a headset.

    Why one function: decoding samples, decoding test-time-optimised rotations and the stitched
    long-sequence sampler all turn (head, rotations, shape) into world joints the same way
    (docs/ego_motion_data.md): T_world_root = T_world_cpf inv(T_head_cpf) inv(T_root_head).

    Args:
        T_world_cpf: (..., T, 4, 4) head poses aligned with the motion frames (not T+1).
        body_rotmats: (..., T, 21, 3, 3) local rotations of SMPL-H joints 1..21.
        betas: (..., nb) one shape per sequence, nb = ``body.num_betas``.
        hand_rotmats: optional (..., T, 30, 3, 3); identity hands when None.

    Returns:
        ``T_world_root`` (..., T, 4, 4), ``joints_world`` (..., T, 22, 3) pelvis + 21 body joints
        in world metres, ``T_world_head`` (..., T, 4, 4) the head joint's world pose.
    """
    betas_t = betas[..., None, :]  # (..., 1, nb): broadcast over frames
    local = body_rotmats if hand_rotmats is None else torch.cat([body_rotmats, hand_rotmats], dim=-3)
    T_world_root = body.root_from_cpf(T_world_cpf, body_rotmats, betas_t)
    fk = body.forward_kinematics(local, betas=betas_t, T_world_root=T_world_root)
    return {
        "T_world_root": T_world_root,
        "joints_world": fk.t_world_joint[..., : NUM_BODY_JOINTS + 1, :],
        "T_world_head": make_transform(fk.R_world_joint[..., HEAD_JOINT, :, :], fk.t_world_joint[..., HEAD_JOINT, :]),
    }
