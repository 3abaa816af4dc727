"""AMASS-layout motion files -> fixed-length training windows of head poses and body targets.

Why: the prior learns p(body | head trajectory) on windows of T frames (docs/ego_motion_data.md,
docs/ego_motion_prior.md). Each window holds T+1 headset poses ``T_world_cpf`` (the condition of frame t needs the pose
at t-1, so T+1 poses give T conditioned frames) and the T frames of targets that follow the first
pose. Processing (FK, contacts, mirroring) is done once and cached with HF ``datasets``.

Per sequence (one ``.npz`` in AMASS layout: ``poses`` (N, 156) axis-angle = root 3 + body 63 +
hands 90, ``trans`` (N, 3) metres, ``betas`` (10 or 16,), ``gender``, ``mocap_framerate``):
1. Resample to 30 fps: an integer multiple of 30 (60, 120, ...) is decimated (every k-th frame);
   any other positive rate is interpolated at t = k / 30 s (quaternion slerp of every joint
   rotation, linear interpolation of ``trans``); 30 fps is kept as is.
2. Betas are zero-padded to 16 (AMASS files with 10 betas: the missing coefficients are 0, the
   mean shape along those directions). ``gender`` is ignored: the body model is neutral.
3. Joints-only FK through :class:`~tasks.ego_motion.body.body_model.BodyModel` (never the mesh):
   ``T_world_root = [R(root_orient) | trans + J_0(betas)]``, joints (N, 52).
4. Floor: by default the source's z = 0 is trusted (AMASS fits and the converted CMU clips stand
   on z = 0); ``refloor="lowest_foot_joint"`` instead shifts each sequence so its lowest ankle/toe
   joint touches z = 0. Either way a sequence whose lowest foot joint is more than
   ``FLOOR_WARNING_M`` from z = 0 is logged, since its contacts will be wrong.
5. Contacts of the 21 non-root body joints: 1 where both the joint's speed and its height above
   z = 0 are below its family's thresholds (:class:`ContactThresholds`: ankles 0.15 m, toes 0.10 m,
   knees and wrists 0.15 m, other joints 0.20 m; 0.3 m/s for ankles and toes, 0.2 m/s otherwise).
   They only see the floor: a hand on a table is not a contact.
6. Headset: ``T_world_cpf = T_world_root @ T_root_head @ T_head_cpf`` (``BodyModel.T_world_cpf_from_root``),
   i.e. the FK head joint pose times the fixed CPF offset.
7. Windows start every ``stride`` frames at frame s: ``T_world_cpf`` = frames s..s+T and the
   targets = frames s+1..s+T. ``start_frame`` stores s. A tail shorter than a stride is dropped.
8. Train only (``include_mirrored``): a left/right mirrored copy of every window (body_model.py's
   mirroring; FK, contacts and headset recomputed from the mirrored rotations and root).

Files named ``shape.npz`` (AMASS's per-subject betas, no motion) are not sequences and are not listed.

Splits, all clip-disjoint: "test" (held out), "train" (everything else), and "train" cut in two for
post-training: "post_train" (clips the prior never sees; GRPO post-trains on them) and
"prior_train" (train minus post_train; the prior trains on it). The bundled CMU clips (default)
use ``assets/split.json`` ({"train": [...], "post_train": [...], "test": [...]}, clip names with
or without ``.npz``; "post_train" is optional and must be a subset of "train"); a directory of
AMASS files can instead use EgoAllo's rule (test = top-level folders ``Transitions_mocap`` and
``SSM_synced``, train = the rest, post_train = a fixed share of train chosen by a hash of each
file's relative path).
``DataSource.extra_prior_train_dir`` adds a second folder of AMASS files (e.g. the converted
ReActIdle idle clips) to "prior_train" only: "train", "post_train" and "test" are unchanged, and
those windows are named ``extra_prior_train/<path below that folder>``. ``extra_post_train_dir``
does the same for "post_train" (``extra_post_train/...``), e.g. head trajectories for
ground-truth-free post-training.

Cache: ``<cache_dir>/<split>-<fingerprint>/`` (``datasets.save_to_disk``), cache_dir defaulting
to ``$DIFFGRPO_CACHE/ego_motion`` or ``~/.cache/diffgrpo/ego_motion``. The fingerprint is a
SHA-256 over the relative path and the SHA-256 of the *bytes* of every source file (content, not
mtimes: copies and touches do not rebuild, edits do), the body model file's bytes, every setting
and ``DATA_VERSION``; change any of them and the cache is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm import tqdm

from ..body.body_model import (
    BodyModel,
    default_body_model_path,
    load_body_model,
    mirror_local_rotations,
    mirror_root_pose,
)
from ..body.geometry import (  # NUM_BETAS, FOOT_JOINTS, NUM_METRIC_JOINTS: also imported from here
    FOOT_JOINTS,
    NUM_BETAS,
    NUM_BODY_JOINTS,
    NUM_HAND_JOINTS,
    NUM_METRIC_JOINTS,
    axis_angle_to_matrix,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)
from .amass import TARGET_FPS, AmassSequence, load_amass_npz

logger = logging.getLogger(__name__)

DATA_VERSION = "ego_motion.data/1"
"""Bump when the processing changes in a way the settings do not capture: every cache rebuilds."""
AMASS_POSE_DIM = 3 * (1 + NUM_BODY_JOINTS + NUM_HAND_JOINTS)  # 156
EGOALLO_TEST_SUBSETS: tuple[str, ...] = ("Transitions_mocap", "SSM_synced")
AMASS_SHAPE_FILE = "shape.npz"
BUNDLED_CMU_DIR = Path(__file__).resolve().parents[1] / "assets" / "cmu"
BUNDLED_SPLIT_FILE = BUNDLED_CMU_DIR.parent / "split.json"
ENV_CACHE_ROOT = "DIFFGRPO_CACHE"
FLOOR_WARNING_M = 0.1
SUMMARY_FILE = "diffgrpo_ego_motion.json"
Split = Literal["train", "prior_train", "post_train", "test"]
SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train", "test")
TRAINING_SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train")
"""Splits that get the training stride and mirrored copies."""
TENSOR_COLUMNS: tuple[str, ...] = ("T_world_cpf", "betas", "body_rotmats", "hand_rotmats", "contacts",
                                   "T_world_root", "joints_world", "start_frame", "mirrored")


class SkippedSequence(ValueError):
    """A source file that cannot give windows; the message says why (logged, then skipped)."""


# ---------------------------------------------------------------- settings
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
class DataSource:
    """Where the AMASS-layout files are and how they split into train and test."""

    root: Path = BUNDLED_CMU_DIR
    """Directory searched recursively for ``*.npz``."""
    split_rule: Literal["split_json", "egoallo"] = "split_json"
    """'split_json': clip names listed in ``split_file``; 'egoallo': test = top folders
    Transitions_mocap and SSM_synced under root, train = the rest."""
    split_file: Path | None = BUNDLED_SPLIT_FILE
    """JSON with "train" and "test" lists of file stems, and optionally "post_train" (a subset of "train");
    read only with split_rule='split_json'."""
    post_train_fraction: float = 0.1
    """split_rule='egoallo' only: share of the train files that form post_train (by a SHA-256 of the
    file's path relative to root, so the choice is fixed and clip-disjoint)."""
    extra_prior_train_dir: Path | None = None
    """A folder of AMASS-layout ``*.npz`` clips (searched recursively) added to the 'prior_train' split
    only, e.g. the converted ReActIdle idle clips; 'train', 'post_train' and 'test' never see them.
    Their sequence names start with ``extra_prior_train/``."""
    extra_post_train_dir: Path | None = None
    """The same for the 'post_train' split (names start with ``extra_post_train/``), e.g. the ReActIdle
    clips. They are full body clips (the head trajectory is computed from the body, as for every clip);
    ``EgoMotionTaskConfig.post_train_heads_only`` then serves only their heads, for ground-truth-free
    post-training."""

    def __post_init__(self) -> None:
        if not 0.0 < self.post_train_fraction < 1.0:
            raise ValueError(f"post_train_fraction={self.post_train_fraction} must be in (0, 1).")

    def extra_dir(self, split: str) -> Path | None:
        """The extra folder added to ``split`` (None for 'train', 'test' and splits without one)."""
        return {"prior_train": self.extra_prior_train_dir, "post_train": self.extra_post_train_dir}.get(split)

    def files(self, split: Split) -> list[Path]:
        """Sorted source files of one split; raises if there are none."""
        root = Path(self.root).expanduser()
        if not root.is_dir():
            hint = " (build the bundled clips with `python -m tasks.ego_motion.data.convert`)" \
                if root == BUNDLED_CMU_DIR else ""
            raise FileNotFoundError(f"AMASS source directory {root} does not exist{hint}; pass "
                                    f"DataSource(root=...) pointing at a folder of AMASS .npz files.")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        # AMASS keeps each subject's betas in a motion-less shape.npz beside the motions: not a sequence.
        all_files = sorted(p for p in root.rglob("*.npz") if p.is_file() and p.name != AMASS_SHAPE_FILE)
        if self.split_rule == "split_json":
            chosen = self._files_from_split_file(root, all_files, split)
        elif self.split_rule == "egoallo":
            is_test = [p.relative_to(root).parts[0] in EGOALLO_TEST_SUBSETS for p in all_files]
            chosen = [p for p, t in zip(all_files, is_test, strict=True) if t == (split == "test")]
            if split in ("prior_train", "post_train"):
                post = [self._hash_share(p.relative_to(root)) < self.post_train_fraction for p in chosen]
                chosen = [p for p, is_post in zip(chosen, post, strict=True) if is_post == (split == "post_train")]
        else:
            raise ValueError(f"split_rule must be 'split_json' or 'egoallo', got {self.split_rule!r}.")
        if not chosen:
            raise FileNotFoundError(f"no .npz files for split '{split}' under {root} (split_rule="
                                    f"{self.split_rule!r}); check the directory and the split rule.")
        if self.extra_dir(split) is not None:
            extra_root = Path(self.extra_dir(split)).expanduser()
            if root.resolve().is_relative_to(extra_root.resolve()) or \
                    extra_root.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"extra_{split}_dir {extra_root} and the source root {root} overlap, so "
                                 "its clips would also land in the other splits; keep the folders apart.")
            chosen = chosen + extra_split_files(extra_root, split)
        return chosen

    @staticmethod
    def _hash_share(relative: Path) -> float:
        """A fixed number in [0, 1) per relative path (first 8 bytes of its SHA-256)."""
        digest = hashlib.sha256(relative.as_posix().encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2.0**64

    def _files_from_split_file(self, root: Path, all_files: list[Path], split: Split) -> list[Path]:
        split_path = Path(self.split_file).expanduser() if self.split_file is not None else None
        if split_path is None or not split_path.exists():
            raise FileNotFoundError(f"split file {split_path} not found; pass DataSource(split_file=...) "
                                    f'with {{"train": [...], "test": [...]}} or split_rule="egoallo".')
        lists = json.loads(split_path.read_text())
        if "post_train" in lists and not {Path(n).stem for n in lists["post_train"]} <= {
                Path(n).stem for n in lists["train"]}:
            raise ValueError(f"{split_path}: every 'post_train' clip must also be listed under 'train'.")
        if split in ("train", "test"):
            wanted = {Path(n).stem for n in lists[split]}
        elif "post_train" not in lists:
            raise ValueError(f"{split_path} has no 'post_train' list, so split {split!r} is undefined; add "
                             '"post_train": [clip names, a subset of "train"] or use split "train".')
        else:
            post = {Path(n).stem for n in lists["post_train"]}
            wanted = post if split == "post_train" else {Path(n).stem for n in lists["train"]} - post
        chosen = [p for p in all_files if p.stem in wanted]
        missing = wanted - {p.stem for p in chosen}
        if missing:
            raise FileNotFoundError(f"{split_path} lists {sorted(missing)} for '{split}' but no such .npz is "
                                    f"under {root}; regenerate the clips or fix the split file.")
        return chosen


def extra_split_files(directory: Path, split: str) -> list[Path]:
    """Sorted ``*.npz`` motion files under ``directory`` (recursive, ``shape.npz`` left out), the extra
    clips of ``split``.

    Raises FileNotFoundError, naming the fix, if the folder is missing or holds none.
    """
    directory = Path(directory).expanduser()
    flag = {"prior_train": "--extra-prior-train-dir", "post_train": "--task.extra-post-train-dir"}.get(split, "")
    hint = ("build the ReActIdle clips with `python -m tasks.ego_motion.data.convert --reactidle --output-dir DIR` "
            f"or pass another folder of AMASS .npz files ({flag})")
    if not directory.is_dir():
        raise FileNotFoundError(f"extra {split.replace('_', '-')} directory {directory} does not exist; {hint}.")
    files = sorted(p for p in directory.rglob("*.npz") if p.is_file() and p.name != AMASS_SHAPE_FILE)
    if not files:
        raise FileNotFoundError(f"extra {split.replace('_', '-')} directory {directory} holds no .npz files; {hint}.")
    return files


def _source_key(path: Path, root: Path, extra_root: Path | None, split: str = "prior_train") -> str:
    """Path of a source file below root, or ``extra_<split>/<path below extra_root>``."""
    if extra_root is not None and path.is_relative_to(extra_root):
        return f"extra_{split}/{path.relative_to(extra_root).as_posix()}"
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------- per sequence
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


def window_starts(num_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """Start frames s with s + T + 1 <= N, every stride frames: (N - T - 1) // stride + 1 of them."""
    return list(range(0, num_frames - window_frames, stride_frames))


def iter_windows(seq: MotionSequence, window_frames: int, stride_frames: int, mirrored: bool
                 ) -> Iterator[dict[str, object]]:
    """Rows of the dataset: T+1 headset poses from frame s, T frames of targets from s + 1."""
    T = window_frames
    for s in window_starts(seq.num_frames, T, stride_frames):
        tgt = slice(s + 1, s + 1 + T)
        yield {
            "T_world_cpf": seq.T_world_cpf[s : s + T + 1].numpy(), "betas": seq.betas.numpy(),
            "body_rotmats": seq.body_rotmats[tgt].numpy(), "hand_rotmats": seq.hand_rotmats[tgt].numpy(),
            "contacts": seq.contacts[tgt].numpy(), "T_world_root": seq.T_world_root[tgt].numpy(),
            "joints_world": seq.joints_world[tgt].numpy(), "sequence": seq.name, "start_frame": s,
            "mirrored": mirrored,
        }  # fmt: skip


def window_features(window_frames: int) -> datasets.Features:
    """Arrow schema of one window row (fixed shapes, float32 arrays; see :class:`EgoMotionWindows`)."""
    T = window_frames
    f32 = "float32"
    return datasets.Features({
        "T_world_cpf": datasets.Array3D((T + 1, 4, 4), f32),
        "betas": datasets.List(datasets.Value(f32), length=NUM_BETAS),
        "body_rotmats": datasets.Array4D((T, NUM_BODY_JOINTS, 3, 3), f32),
        "hand_rotmats": datasets.Array4D((T, NUM_HAND_JOINTS, 3, 3), f32),
        "contacts": datasets.Array2D((T, NUM_BODY_JOINTS), f32),
        "T_world_root": datasets.Array3D((T, 4, 4), f32),
        "joints_world": datasets.Array3D((T, NUM_METRIC_JOINTS, 3), f32),
        "sequence": datasets.Value("string"),
        "start_frame": datasets.Value("int64"), "mirrored": datasets.Value("bool"),
    })  # fmt: skip


# ---------------------------------------------------------------- cache
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$DIFFGRPO_CACHE/ego_motion`` if the variable is set, else ``~/.cache/diffgrpo/ego_motion``."""
    root = os.environ.get(ENV_CACHE_ROOT)
    return (Path(root).expanduser() if root else Path("~/.cache/diffgrpo").expanduser()) / "ego_motion"


def cache_fingerprint(files: Sequence[Path], root: Path, body_model_path: Path, cfg: WindowConfig,
                      split: Split, extra_root: Path | None = None) -> str:
    """SHA-256 (first 20 hex digits) of source file paths + contents, body model bytes and settings.

    Paths are relative to root, or ``extra_<split>/...`` below extra_root (the split's extra clips)."""
    settings = {"version": DATA_VERSION, "split": split, "fps": TARGET_FPS,
                "window_frames": cfg.window_frames,
                "stride_frames": cfg.stride(split), "mirror": cfg.include_mirrored and split in TRAINING_SPLITS,
                "refloor": cfg.refloor, "contacts": dataclasses.asdict(cfg.contacts),
                "body_model_sha256": _sha256_file(body_model_path),
                "files": [[_source_key(p, root, extra_root, split), _sha256_file(p)] for p in files]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def build_windows_dataset(files: Sequence[Path], root: Path, model: BodyModel, cfg: WindowConfig,
                          split: Split, out_dir: Path, fingerprint: str, extra_root: Path | None = None
                          ) -> dict[str, object]:
    """Process every file into windows and ``save_to_disk`` them at out_dir; returns the build summary.

    Unusable files are skipped with a warning naming the file and the reason; if all are, raises.
    """
    stride = cfg.stride(split)
    mirror = cfg.include_mirrored and split in TRAINING_SPLITS
    skipped: dict[str, str] = {}
    counts = {"sequences": 0, "frames_30fps": 0, "windows": 0}

    def generate() -> Iterator[dict[str, object]]:
        for path in tqdm(files, desc=f"ego_motion {split} windows", unit="file", disable=len(files) < 20):
            name = _source_key(path, root, extra_root, split).removesuffix(".npz")
            try:
                with torch.no_grad():
                    seq = load_sequence(path, model, cfg, name=name)
                    mirrored = mirror_sequence(seq, model, cfg.contacts) if mirror else None
            except SkippedSequence as err:
                logger.warning("skipping %s: %s", path, err)
                skipped[str(path)] = str(err)
                continue
            counts["sequences"] += 1
            counts["frames_30fps"] += seq.num_frames
            for copy, is_mirror in ((seq, False), (mirrored, True)):
                if copy is not None:
                    for row in iter_windows(copy, cfg.window_frames, stride, mirrored=is_mirror):
                        counts["windows"] += 1
                        yield row

    scratch = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    # Per-sequence tensors are small ((N, 52, 3, 3), N ~ 10^3): intra-op threads only add overhead,
    # which grows to 30x when the cores are shared (measured: axis_angle_to_matrix on 688 x 52).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            ds = datasets.Dataset.from_generator(generate, features=window_features(cfg.window_frames),
                                                 cache_dir=str(scratch / "arrow"), fingerprint=fingerprint)
        except datasets.exceptions.DatasetGenerationError as err:
            raise (err.__cause__ or err) from err  # the generator's own error, not datasets' wrapper
        except ValueError as err:  # datasets refuses a generator that yields no rows
            if counts["windows"]:
                raise
            raise ValueError(f"no {cfg.window_frames}-frame windows for split '{split}' from {len(files)} "
                             f"files; skipped: {skipped}. Fix or remove those files, or lower window_frames."
                             ) from err
        if skipped:
            logger.warning("ego_motion %s: skipped %d of %d files: %s", split, len(skipped), len(files),
                           "; ".join(f"{Path(p).name}: {why}" for p, why in skipped.items()))
        ds.save_to_disk(str(scratch / "dataset"))
        summary = {"fingerprint": fingerprint, "skipped": skipped, **counts, "files": len(files),
                   "settings": dataclasses.asdict(cfg), "split": split}
        (scratch / "dataset" / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        del ds
        if (out_dir / SUMMARY_FILE).exists():  # another process finished the same build first: keep theirs
            logger.info("ego_motion %s: %s was built concurrently; using that copy", split, out_dir)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of an interrupted build
            os.replace(scratch / "dataset", out_dir)
    finally:
        torch.set_num_threads(num_threads)
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


# ---------------------------------------------------------------- torch-facing accessor
class EgoMotionWindows:
    """Cached windows of one split as batched torch tensors; build with :func:`load_windows`.

    ``get(indices)`` returns, for B = len(indices) and T = window_frames, float32 unless noted:
    T_world_cpf (B, T+1, 4, 4), betas (B, 16), body_rotmats (B, T, 21, 3, 3), hand_rotmats
    (B, T, 30, 3, 3), contacts (B, T, 21), T_world_root (B, T, 4, 4), joints_world (B, T, 22, 3),
    start_frame (B,) int64 (frame of T_world_cpf[:, 0]; targets start one frame later), mirrored (B,) bool.

    ``dataset`` is the same data as a ``with_format("torch")`` HF dataset. ``get`` returns identical
    tensors but gathers rows from zero-copy numpy views of the memory-mapped Arrow columns: the
    torch formatter converts fixed-shape arrays row by row, about 50x slower for batches of 64
    (recipes/benchmarks/bench_data.py).
    """

    def __init__(self, dataset: datasets.Dataset, *, path: Path, summary: dict, from_cache: bool):
        self.path = path
        self.summary = summary
        self.from_cache = from_cache
        """True when the windows were loaded from an existing cache, False when built now."""
        self.window_frames = int(summary["settings"]["window_frames"])
        self.dataset = dataset.with_format("torch", columns=list(TENSOR_COLUMNS))
        self._names = dataset["sequence"]
        table = dataset.data.table  # memory-mapped pyarrow.Table (no indices mapping after load_from_disk)
        self._chunk_starts = np.cumsum([0] + [len(c) for c in table.column(TENSOR_COLUMNS[0]).chunks])
        self._columns = {name: [_numpy_view(c, _feature_shape(dataset.features[name]))
                                for c in table.column(name).chunks] for name in TENSOR_COLUMNS}

    def __len__(self) -> int:
        return int(self._chunk_starts[-1])

    def get(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """Batched windows at ``indices`` (any order, repeats and negative indices allowed)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and not (idx.min() >= -len(self) and idx.max() < len(self)):
            raise IndexError(f"window indices must be in [-{len(self)}, {len(self)}), "
                             f"got {idx.min()}..{idx.max()}.")
        idx = idx % max(len(self), 1)
        chunk = np.searchsorted(self._chunk_starts, idx, side="right") - 1
        out = {}
        for name, views in self._columns.items():
            if len(views) == 1:
                out[name] = torch.from_numpy(views[0][idx])
                continue
            batch = np.empty((idx.size, *views[0].shape[1:]), dtype=views[0].dtype)
            for c in np.unique(chunk):
                rows = chunk == c
                batch[rows] = views[c][idx[rows] - self._chunk_starts[c]]
            out[name] = torch.from_numpy(batch)
        return out

    def sequence_names(self, indices: Sequence[int]) -> list[str]:
        """Source sequence of each window (path relative to the source root, no ``.npz``)."""
        return [self._names[int(i)] for i in indices]


def _feature_shape(feature: object) -> tuple[int, ...]:
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D):
        return tuple(feature.shape)
    if isinstance(feature, datasets.List):
        return (feature.length,)
    return ()


def _numpy_view(chunk: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """(rows, *shape) numpy view of an Arrow column chunk of nested fixed-shape lists; copies only bools."""
    rows = len(chunk)
    if isinstance(chunk, pa.ExtensionArray):
        chunk = chunk.storage
    while pa.types.is_list(chunk.type) or pa.types.is_fixed_size_list(chunk.type):
        chunk = chunk.flatten()  # respects the chunk's offset: still zero-copy
    values = chunk.to_numpy(zero_copy_only=not pa.types.is_boolean(chunk.type))
    return values.reshape(rows, *shape)


def load_windows(
    split: Split,
    *,
    source: DataSource | None = None,
    config: WindowConfig | None = None,
    body_model_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> EgoMotionWindows:
    """Windows of ``split``, from the cache when its fingerprint matches, else built and cached.

    source: default the bundled CMU clips with their split.json. config: default WindowConfig()
    (T = 128, train stride 64, test stride 128, mirrored train copies). body_model_path: default
    ``$DIFFGRPO_SMPLH_PATH`` or the bundled model. cache_dir: default :func:`default_cache_dir`.
    """
    source = source or DataSource()
    config = config or WindowConfig()
    root = Path(source.root).expanduser().resolve()
    extra_root = None if source.extra_dir(split) is None else Path(source.extra_dir(split)).expanduser().resolve()
    files = dataclasses.replace(source, root=root, **{f"extra_{split}_dir": extra_root} if extra_root else {}
                                ).files(split)
    model_path = Path(body_model_path).expanduser() if body_model_path else default_body_model_path()
    if not model_path.exists():
        load_body_model(model_path)  # raises the body model's own error with the download hint
    fingerprint = cache_fingerprint(files, root, model_path, config, split, extra_root)
    out_dir = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{split}-{fingerprint}"
    from_cache = (out_dir / SUMMARY_FILE).exists()
    if from_cache:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
        logger.info("ego_motion %s: %d windows from cache %s (%d files skipped at build)", split,
                    summary["windows"], out_dir, len(summary["skipped"]))
    else:
        logger.info("ego_motion %s: building windows from %d files under %s into %s", split, len(files), root,
                    out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        summary = build_windows_dataset(files, root, load_body_model(model_path), config, split, out_dir,
                                        fingerprint, extra_root)
    return EgoMotionWindows(datasets.load_from_disk(str(out_dir)), path=out_dir, summary=summary,
                            from_cache=from_cache)
