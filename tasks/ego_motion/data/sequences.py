"""One AMASS-layout file -> one processed motion sequence at 30 fps: FK, floor, contacts, headset.

Steps 1-6 of ``tasks.ego_motion.data.windows``'s module docstring (resample, betas, joints-only FK,
floor, contacts, headset) and the left/right mirror, with the settings a window build shares
(:class:`WindowConfig`, :class:`ContactThresholds`, all part of the window cache's fingerprint).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..body.body_model import BodyModel, mirror_local_rotations, mirror_root_pose
from ..body.geometry import (
    FOOT_JOINTS,
    NUM_BETAS,
    NUM_BODY_JOINTS,
    NUM_METRIC_JOINTS,
    axis_angle_to_matrix,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)
from .amass import TARGET_FPS, AmassSequence, load_amass_npz
from .splits import TRAINING_SPLITS, Split

logger = logging.getLogger(__name__)

FLOOR_WARNING_M = 0.1
"""A sequence whose lowest foot joint is farther than this from z = 0 is logged (its contacts will be wrong)."""


class SkippedSequence(ValueError):
    """A source file that cannot give windows; the message says why (logged, then skipped)."""


@dataclass(frozen=True)
class ContactThresholds:
    """Floor-contact thresholds per joint family: contact iff speed < *_speed_mps and z < *_height_m.

    Heights are of the joint centre above z = 0 in metres (a joint centre sits above the skin: an
    SMPL-H ankle rests about 8 cm up, a toe joint 2-5 cm); speeds are central differences at 30 fps.
    Feet get a looser speed limit because a planted foot still rolls from heel to toe.
    """

    ankle_height_m: float = 0.15
    """Ankles (SMPL-H 7, 8)."""
    toe_height_m: float = 0.10
    """Toes ("foot", SMPL-H 10, 11)."""
    knee_height_m: float = 0.15
    """Knees (kneeling)."""
    hand_height_m: float = 0.15
    """Wrists (hands on the floor while crawling or getting up)."""
    other_height_m: float = 0.20
    """Hips, spine, neck, head, collars, shoulders, elbows (sitting or lying on the floor)."""
    foot_speed_mps: float = 0.3
    """Ankles and toes."""
    body_speed_mps: float = 0.2
    """Every other joint."""

    def __post_init__(self) -> None:
        bad = {k: v for k, v in dataclasses.asdict(self).items() if not (v > 0 and math.isfinite(v))}
        if bad:
            raise ValueError(f"contact thresholds must be positive and finite, got {bad}.")

    def per_joint(self) -> tuple[Tensor, Tensor]:
        """(21,) height thresholds (m) and (21,) speed thresholds (m/s) for SMPL-H joints 1..21."""
        height = {4: self.knee_height_m, 5: self.knee_height_m, 7: self.ankle_height_m,
                  8: self.ankle_height_m, 10: self.toe_height_m, 11: self.toe_height_m,
                  20: self.hand_height_m, 21: self.hand_height_m}
        joints = range(1, NUM_BODY_JOINTS + 1)
        h = torch.tensor([height.get(j, self.other_height_m) for j in joints])
        v = torch.tensor([self.foot_speed_mps if j in FOOT_JOINTS else self.body_speed_mps for j in joints])
        return h, v


@dataclass(frozen=True)
class WindowConfig:
    """How sequences are cut into windows and augmented (all part of the cache fingerprint)."""

    window_frames: int = 128
    """T, frames of targets per window (the reference uses 128; CPU demos 32-64)."""
    train_stride_frames: int | None = None
    """Frames between train window starts; None -> window_frames // 2."""
    test_stride_frames: int | None = None
    """Frames between test window starts; None -> window_frames (every frame evaluated once)."""
    include_mirrored: bool = True
    """Add a left/right mirrored copy of every train window (never for test)."""
    refloor: Literal["none", "lowest_foot_joint"] = "none"
    """'none': trust the source's z = 0; 'lowest_foot_joint': shift each sequence so min foot joint z = 0."""
    contacts: ContactThresholds = field(default_factory=ContactThresholds)

    def __post_init__(self) -> None:
        if self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}.")
        for name in ("train_stride_frames", "test_stride_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (default), got {value}.")
        if self.refloor not in ("none", "lowest_foot_joint"):
            raise ValueError(f"refloor must be 'none' or 'lowest_foot_joint', got {self.refloor!r}.")

    def stride(self, split: Split) -> int:
        if split in TRAINING_SPLITS:
            return self.train_stride_frames or max(1, self.window_frames // 2)
        return self.test_stride_frames or self.window_frames


@dataclass(frozen=True)
class MotionSequence:
    """One processed sequence at 30 fps, world +Z up, float32; N frames.

    betas (16,); T_world_root (N, 4, 4) pelvis pose; body_rotmats (N, 21, 3, 3) and hand_rotmats
    (N, 30, 3, 3) local rotations; joints_world (N, 22, 3) pelvis + 21 body joints in metres;
    contacts (N, 21) in {0, 1}; T_world_cpf (N, 4, 4) headset (CPF) pose.
    """

    name: str
    betas: Tensor
    T_world_root: Tensor
    body_rotmats: Tensor
    hand_rotmats: Tensor
    joints_world: Tensor
    contacts: Tensor
    T_world_cpf: Tensor

    @property
    def num_frames(self) -> int:
        return int(self.T_world_root.shape[0])


def read_amass_npz(path: Path) -> AmassSequence:
    """:func:`~tasks.ego_motion.data.amass.load_amass_npz`, every validation failure a :class:`SkippedSequence`.

    Why: one bad file in an AMASS tree of thousands should be logged and skipped, not end the build.
    """
    try:
        seq = load_amass_npz(path)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise SkippedSequence(f"{type(err).__name__}: {err}") from err
    if seq.betas.shape[0] > NUM_BETAS:
        raise SkippedSequence(f"betas has {seq.betas.shape[0]} coefficients, expected at most {NUM_BETAS}")
    return seq


def resample_to_fps(rotmats: Tensor, trans: Tensor, src_fps: float, dst_fps: float = TARGET_FPS
                    ) -> tuple[Tensor, Tensor]:
    """Resample (N, J, 3, 3) rotations and (N, 3) translations from src_fps to dst_fps.

    Integer ratios decimate (frame k*r); others sample t = k / dst_fps, k = 0.. while t <= the
    last source time, with slerp for rotations and linear interpolation for translations.
    """
    if not (math.isfinite(src_fps) and src_fps > 0):
        raise ValueError(f"source frame rate must be positive, got {src_fps}.")
    ratio = src_fps / dst_fps
    step = round(ratio)
    if step >= 1 and abs(ratio - step) < 1e-6 * ratio:
        return rotmats[::step], trans[::step]
    n_src = rotmats.shape[0]
    n_out = int(math.floor((n_src - 1) / ratio + 1e-9)) + 1
    src_pos = torch.arange(n_out, dtype=torch.float64) * ratio  # fractional source frame index
    i0 = src_pos.floor().long().clamp(max=max(n_src - 2, 0))
    i1 = (i0 + 1).clamp(max=n_src - 1)
    alpha = (src_pos - i0).to(trans.dtype)
    q = matrix_to_quaternion(rotmats)  # (N, J, 4)
    q_out = slerp_quaternions(q[i0], q[i1], alpha[:, None].expand(n_out, q.shape[1]))
    trans_out = trans[i0] + alpha[:, None] * (trans[i1] - trans[i0])
    return quaternion_to_matrix(q_out), trans_out


def compute_contacts(joints_world: Tensor, thresholds: ContactThresholds, fps: float = TARGET_FPS) -> Tensor:
    """Floor contacts of the 21 non-root joints: (N, 22 or 52, 3) world joints -> (N, 21) float {0, 1}.

    Speed is the central difference |p[t+1] - p[t-1]| * fps / 2 (one-sided at the ends), height is z.
    """
    p = joints_world[:, 1 : NUM_BODY_JOINTS + 1]  # (N, 21, 3)
    if p.shape[0] < 2:
        raise ValueError(f"contacts need at least 2 frames, got {p.shape[0]}.")
    vel = torch.empty_like(p)
    vel[1:-1] = (p[2:] - p[:-2]) * (fps / 2)
    vel[0], vel[-1] = (p[1] - p[0]) * fps, (p[-1] - p[-2]) * fps
    height_m, speed_mps = (x.to(p) for x in thresholds.per_joint())
    return ((vel.norm(dim=-1) < speed_mps) & (p[..., 2] < height_m)).to(p.dtype)


def _sequence_from_pose(model: BodyModel, name: str, betas: Tensor, T_world_root: Tensor,
                        local_rotmats: Tensor, thresholds: ContactThresholds) -> MotionSequence:
    """FK, contacts and headset for (N, 4, 4) root poses and (N, 51, 3, 3) local rotations."""
    model_betas = _model_betas(model, betas)
    joints = model.forward_kinematics(local_rotmats, betas=model_betas, T_world_root=T_world_root)
    joints_world = joints.t_world_joint[:, :NUM_METRIC_JOINTS]
    return MotionSequence(
        name=name, betas=betas, T_world_root=T_world_root,
        body_rotmats=local_rotmats[:, :NUM_BODY_JOINTS], hand_rotmats=local_rotmats[:, NUM_BODY_JOINTS:],
        joints_world=joints_world, contacts=compute_contacts(joints_world, thresholds),
        T_world_cpf=model.T_world_cpf_from_root(T_world_root, local_rotmats, model_betas),
    )  # fmt: skip


def _model_betas(model: BodyModel, betas: Tensor) -> Tensor:
    """The 16 stored betas as the body model's B coefficients (zero-padded; truncation must drop zeros)."""
    if model.num_betas >= NUM_BETAS:
        return torch.nn.functional.pad(betas, (0, model.num_betas - NUM_BETAS))
    if betas[model.num_betas :].abs().max() > 0:
        raise SkippedSequence(f"betas {model.num_betas}..15 are nonzero but the body model ({model.source}) "
                              f"has only {model.num_betas}; use a body model with 16 betas")
    return betas[: model.num_betas]


def load_sequence(path: Path, model: BodyModel, cfg: WindowConfig, name: str | None = None) -> MotionSequence:
    """Read, resample, FK, floor, contacts and headset for one file (steps 1-6 of the module doc)."""
    raw = read_amass_npz(path)
    poses = torch.as_tensor(raw.poses, dtype=torch.float32).reshape(-1, 52, 3)
    trans = torch.as_tensor(raw.trans, dtype=torch.float32)
    rotmats, trans = resample_to_fps(axis_angle_to_matrix(poses), trans, raw.mocap_framerate)
    if rotmats.shape[0] < cfg.window_frames + 1:
        raise SkippedSequence(f"too short: {rotmats.shape[0]} frames at 30 fps (from {raw.num_frames} at "
                              f"{raw.mocap_framerate:g} fps), a window needs {cfg.window_frames + 1}")
    # 10-beta files: the missing coefficients are zero (the mean shape along those directions).
    if len(raw.betas) < NUM_BETAS:
        logger.info("%s: %d betas, zero-padded to %d", path, len(raw.betas), NUM_BETAS)
    betas = torch.nn.functional.pad(torch.as_tensor(raw.betas, dtype=torch.float32),
                                    (0, NUM_BETAS - len(raw.betas)))
    T_world_root = model.T_world_root_from_amass(rotmats[:, 0], trans, _model_betas(model, betas))
    name = name or path.stem
    seq = _sequence_from_pose(model, name, betas, T_world_root, rotmats[:, 1:], cfg.contacts)
    floor_z = float(seq.joints_world[:, list(FOOT_JOINTS), 2].min())
    if cfg.refloor == "lowest_foot_joint":
        T_world_root = T_world_root.clone()
        T_world_root[:, 2, 3] -= floor_z
        seq = _sequence_from_pose(model, name, betas, T_world_root, rotmats[:, 1:], cfg.contacts)
    elif abs(floor_z) > FLOOR_WARNING_M:
        logger.warning("%s: lowest foot joint is at z = %.3f m, not near the floor z = 0; its contacts will "
                       "be wrong (use WindowConfig(refloor='lowest_foot_joint') to re-floor)", path, floor_z)
    return seq


def mirror_sequence(seq: MotionSequence, model: BodyModel, thresholds: ContactThresholds) -> MotionSequence:
    """Left/right mirror across the world X = 0 plane; FK, contacts and headset recomputed."""
    local = torch.cat([seq.body_rotmats, seq.hand_rotmats], dim=-3)
    return _sequence_from_pose(model, seq.name, seq.betas, mirror_root_pose(seq.T_world_root),
                               mirror_local_rotations(local), thresholds)
