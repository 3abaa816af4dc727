"""AMASS-layout motion files: a validated reader and writer.

Why: AMASS (SMPL-H fits) is the reference training data, and our converted CMU clips use the same
``.npz`` layout so one loader serves both. Layout per file:

    poses (N, 156)  axis-angle, radians: root 3 | 21 body joints 63 | 30 hand joints 90
    trans (N, 3)    metres, world +Z up; pelvis world position = trans + J_0(betas)
    betas (B,)      shape coefficients (16 for SMPL-H)
    gender          "neutral" | "male" | "female"
    mocap_framerate frames per second

AMASS also stores ``dmpls`` and, for some datasets, ``poses`` with 165 or 159 entries; only the
keys above are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TARGET_FPS = 30.0
"""Frames per second every ego-motion sequence is resampled to (EgoAllo's rate): windows, metrics, rewards."""

logger = logging.getLogger(__name__)

AMASS_KEYS: tuple[str, ...] = ("poses", "trans", "betas", "gender", "mocap_framerate")
POSE_DIM = 156
MIN_FRAMES = 2


@dataclass(frozen=True)
class AmassSequence:
    """One motion in the AMASS layout (see the module docstring for units and frames).

    poses: (N, 156) float32 axis-angle. trans: (N, 3) float32 metres. betas: (B,) float32.
    gender: "neutral", "male" or "female". mocap_framerate: frames per second.
    """

    poses: np.ndarray
    trans: np.ndarray
    betas: np.ndarray
    gender: str
    mocap_framerate: float

    def __post_init__(self) -> None:
        n = self.poses.shape[0] if self.poses.ndim == 2 else -1
        if self.poses.ndim != 2 or self.poses.shape[1] != POSE_DIM:
            raise ValueError(
                f"poses must be (N, {POSE_DIM}) axis-angle (root 3 + body 63 + hands 90), "
                f"got {self.poses.shape}."
            )
        if self.trans.shape != (n, 3):
            raise ValueError(f"trans must be ({n}, 3) to match poses, got {self.trans.shape}.")
        if self.betas.ndim != 1:
            raise ValueError(f"betas must be 1-D (B,), got {self.betas.shape}.")
        if n < MIN_FRAMES:
            raise ValueError(f"sequence has {n} frames; at least {MIN_FRAMES} are needed.")
        for name in ("poses", "trans", "betas"):
            bad = ~np.isfinite(getattr(self, name))
            if bad.any():
                rows = np.unique(np.nonzero(bad)[0])[:5].tolist()
                raise ValueError(
                    f"{name} has NaN/inf values (first rows {rows}); drop or repair those frames."
                )
        if self.gender not in ("neutral", "male", "female"):
            raise ValueError(f"gender must be 'neutral', 'male' or 'female', got {self.gender!r}.")
        if not (np.isfinite(self.mocap_framerate) and self.mocap_framerate > 0):
            raise ValueError(f"mocap_framerate must be a positive number, got {self.mocap_framerate}.")

    @property
    def num_frames(self) -> int:
        return int(self.poses.shape[0])

    @property
    def root_orient(self) -> np.ndarray:
        """(N, 3) root axis-angle."""
        return self.poses[:, :3]

    @property
    def body_pose(self) -> np.ndarray:
        """(N, 63) axis-angle of the 21 body joints."""
        return self.poses[:, 3:66]

    @property
    def hand_pose(self) -> np.ndarray:
        """(N, 90) axis-angle of the 30 hand joints."""
        return self.poses[:, 66:156]


def load_amass_npz(path: str | Path, *, expected_framerate: float | None = None) -> AmassSequence:
    """Read and validate an AMASS-layout ``.npz``.

    expected_framerate: if given, a file at another rate raises (resample it first).
    Raises KeyError listing the missing keys, ValueError for bad shapes, NaNs or frame rates.
    """
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in AMASS_KEYS if k not in npz.files]
        if missing:
            raise KeyError(
                f"{path} lacks AMASS keys {missing} (has {sorted(npz.files)}); expected {list(AMASS_KEYS)}."
            )
        poses = np.asarray(npz["poses"], dtype=np.float32)
        if poses.ndim == 2 and poses.shape[1] in (159, 165):  # SMPL-X style extras (jaw/eyes) after body
            raise ValueError(
                f"{path}: poses has {poses.shape[1]} entries per frame (SMPL-X layout); this "
                f"loader reads SMPL-H AMASS files with {POSE_DIM}."
            )
        gender = npz["gender"]
        gender = gender.item() if gender.shape == () else str(gender)
        if isinstance(gender, bytes):
            gender = gender.decode()
        seq = AmassSequence(
            poses=poses,
            trans=np.asarray(npz["trans"], dtype=np.float32),
            betas=np.asarray(npz["betas"], dtype=np.float32),
            gender=str(gender),
            mocap_framerate=float(npz["mocap_framerate"]),
        )
    if expected_framerate is not None and abs(seq.mocap_framerate - expected_framerate) > 1e-3:
        raise ValueError(
            f"{path} is at {seq.mocap_framerate} fps, expected {expected_framerate}; resample it "
            f"(tasks.ego_motion.data.retarget.resample_motion) or change the expected rate."
        )
    return seq


def save_amass_npz(path: str | Path, seq: AmassSequence) -> None:
    """Write ``seq`` as a compressed float32 AMASS-layout ``.npz`` (validated by construction)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        poses=seq.poses.astype(np.float32),
        trans=seq.trans.astype(np.float32),
        betas=seq.betas.astype(np.float32),
        gender=np.array(seq.gender),
        mocap_framerate=np.array(seq.mocap_framerate, dtype=np.float64),
    )
    logger.debug("wrote %s (%d frames)", path, seq.num_frames)
