"""A Project Aria recording's MPS outputs -> the head (CPF) trajectory the ego-motion prior is conditioned on.

Why one module: the prior expects central-pupil-frame poses at 30 fps in a world with +Z up and
the floor at z = 0 (``condition.py``). Aria's Machine Perception Services (MPS) give something
close but not the same: the *device* pose (not the CPF), at about 1 kHz, in a SLAM world whose
origin is wherever tracking started and whose up axis is only known through the ``gravity_*_world``
columns. Everything Aria-specific (reading, device -> CPF, gravity, floor) lives here, and
:func:`load_recording` runs it in this order:

1. :func:`read_closed_loop_trajectory`: ``closed_loop_trajectory.csv`` -> ``T_mps_device`` (N, 4, 4),
   device timestamps and the gravity vector, validated (columns, NaN quaternions, time order).
2. :func:`T_device_cpf_from_calibration`: the device calibration (``.json`` or ``.vrs``), else the
   CAD value of an Aria Gen1 device; ``T_mps_cpf = T_mps_device @ T_device_cpf``.
3. :func:`resample_poses`: to 30 fps (slerp of rotations, linear translations).
4. :func:`gravity_alignment`: the smallest rotation taking the measured up direction (minus
   gravity) to +Z; a gravity column that is missing, zero or inconsistent is refused.
5. :func:`read_semidense_points` + :func:`estimate_floor_height`: a robust 1-D estimate of the
   floor height from the lowest semi-dense points; without points, :func:`floor_from_head_height`.
6. ``T_world_mps = [R_world_mps | (0, 0, -floor_z)]`` and ``T_world_cpf = T_world_mps @ T_mps_cpf``.

Frames (``T_a_b`` maps points in frame b to frame a; metres):
- ``mps``: the MPS SLAM world of the CSV (called "world" in the file's column names).
- ``device``: Aria's device frame; on Gen1 the left SLAM camera (``camera-slam-left``).
- ``cpf``: the central pupil frame between the eyes: +Z forward, +Y up, +X to the wearer's left,
  the same axes as the head joint of the SMPL-H body model (``body/body_model.py``).
- ``world``: the prior's world: the ``mps`` world turned so that +Z points against gravity and
  shifted so that the floor is z = 0. The turn is the smallest one, so the horizontal axes stay
  as close to the ``mps`` ones as possible (they are otherwise arbitrary: the prior is yaw-invariant).

Reading the files (``projectaria-tools``, checked row by row) is ``aria_files.py``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tasks.ego_motion.body.body_model import BodyModel
from tasks.ego_motion.body.geometry import (
    axis_angle_to_matrix,
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)
from tasks.ego_motion.data.aria_files import (
    ARIA_EXTRA_HINT,
    CLOSED_LOOP_COLUMNS,
    CLOSED_LOOP_FILE,
    QUATERNION_COLUMNS,
    SEMIDENSE_COLUMNS,
    SEMIDENSE_POINTS_FILE,
    AriaConfig,
    DeviceTrajectory,
    _projectaria,
    read_closed_loop_trajectory,
    read_semidense_points,
)
from tasks.ego_motion.data.aria_floor import (
    FloorEstimate,
    estimate_floor_height,
    floor_from_head_height,
    standing_cpf_height_m,
)

logger = logging.getLogger(__name__)

GEN1_DEVICE_FRAME = "camera-slam-left"
"""The sensor Aria Gen1 calibrations anchor the device frame to (their ``OriginSpecification``)."""
STANDARD_GRAVITY_MPS2 = 9.80665

__all__ = [  # the readers are aria_files'; imported here, this module is the one place users import from
    "ARIA_EXTRA_HINT",
    "CLOSED_LOOP_COLUMNS",
    "CLOSED_LOOP_FILE",
    "QUATERNION_COLUMNS",
    "SEMIDENSE_COLUMNS",
    "SEMIDENSE_POINTS_FILE",
    "DeviceTrajectory",
    "read_closed_loop_trajectory",
    "read_semidense_points",
    "AriaConfig",
    "AriaRecording",
    "FloorEstimate",
    "GravityAlignment",
    "T_device_cpf_from_calibration",
    "estimate_floor_height",
    "floor_from_head_height",
    "gravity_alignment",
    "load_recording",
    "resample_poses",
    "standing_cpf_height_m",
]


# ---------------------------------------------------------------------------------------------
# 2. Device -> CPF


def T_device_cpf_from_calibration(
    calibration_path: str | Path | None = None,
    cad_build_version: Literal["DVT-S", "DVT-L"] = "DVT-S",
) -> tuple[Float[Tensor, "4 4"], str]:
    """The central pupil frame in the device frame, float64 metres, and where it came from.

    Why: MPS tracks the device (on Gen1 the left SLAM camera), the prior was trained on the CPF;
    feeding it the device pose is a known trap (for Gen1 CAD: 7 cm apart and turned by 97 degrees).

    ``calibration_path``: a device calibration JSON (``device_calibration_from_json``) or the
    recording's ``.vrs`` (its stamped factory calibration); ``get_transform_device_cpf()`` of it.
    None: the default, the CAD (design) value projectaria-tools keeps for an Aria Gen1 device of
    build ``cad_build_version`` with its device frame at ``camera-slam-left`` (the table in
    projectaria-tools' ``core/calibration/DeviceCadExtrinsics.cpp``). The two builds differ by
    about 2 mm; a unit's own calibration differs from CAD by millimetres as well. Not valid for
    Aria Gen2, whose device frame is another sensor: pass its calibration.

    Raises:
        ValueError: an unknown suffix, or a file projectaria-tools cannot read as a calibration.
    """
    core = _projectaria()
    if calibration_path is None:
        spec = {"DeviceClassInfo": {"BuildVersion": cad_build_version, "DeviceClass": "Aria"},
                "OriginSpecification": {"Type": "Custom", "ChildLabel": GEN1_DEVICE_FRAME}}
        device_calibration = core.calibration.device_calibration_from_json_string(json.dumps(spec))
        source = f"CAD value of an Aria Gen1 {cad_build_version} (projectaria-tools DeviceCadExtrinsics)"
    else:
        path = Path(calibration_path)
        if not path.is_file():
            raise FileNotFoundError(f"no device calibration at {path}; pass a calibration .json or the .vrs file.")
        if path.suffix == ".json":
            device_calibration = core.calibration.device_calibration_from_json(str(path))
        elif path.suffix == ".vrs":
            from projectaria_tools.core import data_provider

            provider = data_provider.create_vrs_data_provider(str(path))
            device_calibration = None if provider is None else provider.get_device_calibration()
        else:
            raise ValueError(f"--calibration {path}: expected a device calibration .json or a recording .vrs.")
        source = str(path)
    if device_calibration is None:
        raise ValueError(f"projectaria-tools could not read a device calibration from {calibration_path}.")
    T_device_cpf = torch.from_numpy(np.asarray(device_calibration.get_transform_device_cpf().to_matrix()))
    if T_device_cpf.shape != (4, 4) or not torch.isfinite(T_device_cpf).all():
        raise ValueError(f"the device-to-CPF transform from {source} is not a finite 4x4 matrix: {T_device_cpf}.")
    return T_device_cpf.to(torch.float64), source


# ---------------------------------------------------------------------------------------------
# 3. Resampling


def resample_poses(
    timestamps_us: Int[Tensor, " N"],
    T_mps_x: Float[Tensor, "N 4 4"],
    fps: float,
    max_gap_s: float,
) -> tuple[Float[Tensor, " L"], Float[Tensor, "L 4 4"]]:
    """Poses at t_k = t_0 + k / fps (k = 0, 1, ... while t_k <= t_last): slerp of rotations, linear translations.

    A last t_k up to 1/1000 of a frame after t_last takes the last pose (integer-microsecond
    timestamps of a 30 fps source fall up to 0.5 us short of k / fps).

    Args:
        timestamps_us: (N,) strictly increasing source times, microseconds.
        T_mps_x: (N, 4, 4) rigid transforms at those times.
        fps: output rate, frames per second.
        max_gap_s: refuse to interpolate across source samples further apart than this.

    Returns:
        (L,) float64 output times in microseconds and (L, 4, 4) float64 transforms.

    Raises:
        ValueError: a gap longer than ``max_gap_s`` inside the recording.
    """
    t_src = timestamps_us.to(torch.float64)
    t_src = t_src - t_src[0]  # (N,) from 0, exact in float64
    num_out = int(math.floor(float(t_src[-1]) * fps / 1e6 + 1e-3)) + 1  # a pose 1/1000 frame short of the end counts
    t_out = torch.arange(num_out, dtype=torch.float64) * (1e6 / fps)  # (L,)
    if len(t_src) == 1:
        return t_out + timestamps_us[0], T_mps_x.to(torch.float64).clone()
    i0 = (torch.searchsorted(t_src, t_out, right=True) - 1).clamp(0, len(t_src) - 2)  # (L,)
    i1 = i0 + 1
    span_us = t_src[i1] - t_src[i0]
    if (span_us > max_gap_s * 1e6).any():
        k = int(torch.nonzero(span_us > max_gap_s * 1e6)[0])
        raise ValueError(f"the trajectory has a {float(span_us[k]) / 1e6:.3f} s gap "
                         f"{float(t_src[i0[k]]) / 1e6:.3f} s after its start (tracking lost?), longer than "
                         f"--aria.max-gap-s {max_gap_s}; raise that flag to interpolate across it, or process the "
                         "parts separately.")
    alpha = ((t_out - t_src[i0]) / span_us).clamp(0.0, 1.0)  # (L,)
    T = T_mps_x.to(torch.float64)
    q = matrix_to_quaternion(T[:, :3, :3])  # (N, 4)
    R = quaternion_to_matrix(slerp_quaternions(q[i0], q[i1], alpha))
    t = T[i0, :3, 3] + alpha[:, None] * (T[i1, :3, 3] - T[i0, :3, 3])
    return t_out + timestamps_us[0].to(torch.float64), make_transform(R, t)


# ---------------------------------------------------------------------------------------------
# 4. Gravity


@dataclass(frozen=True)
class GravityAlignment:
    """The rotation that makes the MPS world +Z-up, and what it was measured from."""

    R_world_mps: Float[Tensor, "3 3"]
    """Smallest rotation taking the measured up direction (minus mean gravity) to +Z (float64)."""
    tilt_deg: float
    """Angle between the MPS world's +Z and the measured up direction: 0 for a Z-up world."""
    spread_deg: float
    """Largest angle between one row's gravity direction and the mean."""
    gravity_norm_mps2: float
    """Mean gravity magnitude, m/s^2 (9.81 in MPS files)."""


def gravity_alignment(gravity_mps: Float[Tensor, "N 3"], max_spread_deg: float = 1.0) -> GravityAlignment:
    """Check gravity instead of assuming the MPS world is Z-up, and the rotation that makes it so.

    Rotation: with u = -mean(g_i / |g_i|) normalised, the axis u x e_z and the angle
    atan2(|u x e_z|, u . e_z) (Rodrigues, ``geometry.axis_angle_to_matrix``); an upside-down world
    (u = -e_z) is turned by 180 degrees about x.

    Raises:
        ValueError: (cannot be corrected) a gravity vector that is non-finite or shorter than 1 m/s^2
            (the column is empty or zero), or per-row directions that disagree by more than
            ``max_spread_deg`` (the rows do not share one world).
    """
    g = gravity_mps.to(torch.float64)
    norm = g.norm(dim=-1)  # (N,)
    if not torch.isfinite(g).all() or (norm < 1.0).any():
        raise ValueError(f"the gravity_*_world columns do not give a direction (norms from {float(norm.min()):.3g} "
                         f"to {float(norm.max()):.3g} m/s^2, expected about {STANDARD_GRAVITY_MPS2}); the world "
                         "cannot be turned Z-up. Re-run MPS: current versions write gravity.")
    down = (g / norm[:, None]).mean(dim=0)
    down = down / down.norm()
    spread_deg = math.degrees(float(torch.acos((g / norm[:, None] @ down).clamp(-1.0, 1.0)).max()))
    if spread_deg > max_spread_deg:
        raise ValueError(f"the gravity directions of the rows differ by up to {spread_deg:.2f} degrees (more than "
                         f"--aria.max-gravity-spread-deg {max_spread_deg}); the rows are not in one world, so the "
                         "world cannot be turned Z-up reliably.")
    up, e_z = -down, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    axis = torch.linalg.cross(up, e_z)
    sin, cos = float(axis.norm()), float(up @ e_z)
    angle = math.atan2(sin, cos)
    if sin > 1e-12:
        R_world_mps = axis_angle_to_matrix(axis / sin * angle)
    elif cos > 0:
        R_world_mps = torch.eye(3, dtype=torch.float64)
    else:  # upside down: any half turn about a horizontal axis
        R_world_mps = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    return GravityAlignment(R_world_mps, math.degrees(angle), spread_deg, float(norm.mean()))


# ---------------------------------------------------------------------------------------------
# Everything in order


@dataclass(frozen=True)
class AriaRecording:
    """A recording's head trajectory in the prior's world, with every transform that produced it."""

    T_world_cpf: Float[Tensor, "L 4 4"]
    """CPF poses at ``fps``, +Z up, floor z = 0, float64 metres. L poses condition L - 1 motion frames."""
    timestamps_us: Float[Tensor, " L"]
    """Device-clock time of each pose (``tracking_timestamp_us`` scale), microseconds."""
    T_world_mps: Float[Tensor, "4 4"]
    """The MPS world in the prior's world: [R_world_mps | (0, 0, -floor_z)]; invert it to overlay on MPS points."""
    T_device_cpf: Float[Tensor, "4 4"]
    calibration_source: str
    gravity: GravityAlignment
    floor: FloorEstimate
    graph_uid: str
    source_rate_hz: float
    """Mean pose rate of the CSV (about 1000 for MPS)."""


def load_recording(
    mps_dir: str | Path,
    body: BodyModel,
    cfg: AriaConfig | None = None,
    *,
    calibration_path: str | Path | None = None,
    fps: float = 30.0,
) -> AriaRecording:
    """Steps 1-6 of the module docstring on an MPS output folder (``closed_loop_trajectory.csv`` and,
    when present, ``semidense_points.csv.gz``; both found in the folder or any folder below it)."""
    cfg = cfg or AriaConfig()
    mps_dir = Path(mps_dir)
    trajectory = read_closed_loop_trajectory(_find(mps_dir, CLOSED_LOOP_FILE, required=True), cfg.graph_uid)  # 1
    T_device_cpf, source = T_device_cpf_from_calibration(calibration_path, cfg.cad_build_version)  # 2
    T_mps_cpf = trajectory.T_mps_device @ T_device_cpf
    timestamps_us, T_mps_cpf = resample_poses(trajectory.timestamps_us, T_mps_cpf, fps, cfg.max_gap_s)  # 3
    gravity = gravity_alignment(trajectory.gravity_mps, cfg.max_gravity_spread_deg)  # 4
    if gravity.tilt_deg > 0.1:
        logger.info("the MPS world is %.2f degrees from Z-up (gravity); turned upright", gravity.tilt_deg)
    cpf_z_m = (gravity.R_world_mps @ T_mps_cpf[:, :3, 3:4])[:, 2, 0]  # (L,) heights, floor not yet at 0
    points_path = _find(mps_dir, SEMIDENSE_POINTS_FILE, required=False) if cfg.use_semidense_floor else None  # 5
    if points_path is not None:
        points = read_semidense_points(points_path, trajectory.graph_uid, cfg.max_inverse_distance_std,
                                       cfg.max_distance_std_m)
        floor = estimate_floor_height(points @ gravity.R_world_mps[2], cpf_z_m, cfg)
    else:
        standing = cfg.standing_cpf_height_m if cfg.standing_cpf_height_m is not None else standing_cpf_height_m(body)
        floor = floor_from_head_height(cpf_z_m, standing)
    T_world_mps = make_transform(gravity.R_world_mps, torch.tensor([0.0, 0.0, -floor.floor_z_m], dtype=torch.float64))
    duration_s = float(trajectory.timestamps_us[-1] - trajectory.timestamps_us[0]) / 1e6
    return AriaRecording(
        T_world_cpf=T_world_mps @ T_mps_cpf,  # 6
        timestamps_us=timestamps_us,
        T_world_mps=T_world_mps,
        T_device_cpf=T_device_cpf,
        calibration_source=source,
        gravity=gravity,
        floor=floor,
        graph_uid=trajectory.graph_uid,
        source_rate_hz=(len(trajectory.timestamps_us) - 1) / duration_s if duration_s > 0 else float("nan"),
    )


def _find(folder: Path, name: str, *, required: bool) -> Path | None:
    """``folder/name``, or the one file of that name below ``folder`` (MPS nests outputs in slam/)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder at {folder}; pass the MPS output folder of the recording.")
    found = [folder / name] if (folder / name).is_file() else sorted(folder.rglob(name))
    if len(found) > 1:
        raise ValueError(f"{folder} holds {len(found)} files named {name}: {found}; pass the folder of one recording.")
    if not found and required:
        raise FileNotFoundError(f"no {name} in {folder} or below it; pass the MPS output folder (the one with slam/).")
    return found[0] if found else None
