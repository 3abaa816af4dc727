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

Files are read with ``projectaria-tools`` (optional: ``pip install -e '.[aria]'``). Its readers
print a message and return what they parsed so far when a row is bad, so every file's header and
row count are checked here first, and a short row is diagnosed with Python's ``csv`` module.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tasks.ego_motion.body.body_model import BodyModel
from tasks.ego_motion.body.geometry import (
    HEAD_JOINT,
    axis_angle_to_matrix,
    make_transform,
    matrix_to_quaternion,
    quaternion_to_matrix,
    slerp_quaternions,
)

logger = logging.getLogger(__name__)

ARIA_EXTRA_HINT = "pip install -e '.[aria]' (or pip install projectaria-tools)"
CLOSED_LOOP_FILE = "closed_loop_trajectory.csv"
SEMIDENSE_POINTS_FILE = "semidense_points.csv.gz"
CLOSED_LOOP_COLUMNS: tuple[str, ...] = (
    "graph_uid", "tracking_timestamp_us", "utc_timestamp_ns",
    "tx_world_device", "ty_world_device", "tz_world_device",
    "qx_world_device", "qy_world_device", "qz_world_device", "qw_world_device",
    "device_linear_velocity_x_device", "device_linear_velocity_y_device", "device_linear_velocity_z_device",
    "angular_velocity_x_device", "angular_velocity_y_device", "angular_velocity_z_device",
    "gravity_x_world", "gravity_y_world", "gravity_z_world", "quality_score",
)  # fmt: skip
"""Columns projectaria-tools' ``read_closed_loop_trajectory`` requires (extra ones, e.g. ``geo_available``
and ``*_ecef_device``, are ignored)."""
QUATERNION_COLUMNS: tuple[str, ...] = ("qx_world_device", "qy_world_device", "qz_world_device", "qw_world_device")
SEMIDENSE_COLUMNS: tuple[str, ...] = (
    "uid", "graph_uid", "px_world", "py_world", "pz_world", "inv_dist_std", "dist_std",
)  # fmt: skip
"""Columns projectaria-tools' ``read_global_point_cloud`` requires."""
GEN1_DEVICE_FRAME = "camera-slam-left"
"""The sensor Aria Gen1 calibrations anchor the device frame to (their ``OriginSpecification``)."""
STANDARD_GRAVITY_MPS2 = 9.80665
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class AriaConfig:
    """How an Aria recording becomes a head trajectory; every field is a CLI flag of recipes/infer_ego_motion.py."""

    graph_uid: str | None = None
    """SLAM map to use when the trajectory has several (poses of different maps live in different worlds)."""
    cad_build_version: Literal["DVT-S", "DVT-L"] = "DVT-S"
    """Without --calibration: the Aria Gen1 frame size whose CAD device-to-CPF transform is used."""
    max_gap_s: float = 0.1
    """Refuse to interpolate head poses across a gap in the trajectory longer than this (seconds)."""
    max_gravity_spread_deg: float = 1.0
    """Refuse when the per-row gravity directions disagree by more than this (degrees)."""
    max_inverse_distance_std: float = 0.001
    """Keep semi-dense points with inv_dist_std below this (projectaria-tools' default filter)."""
    max_distance_std_m: float = 0.05
    """Keep semi-dense points with dist_std below this, metres (projectaria-tools' default filter)."""
    use_semidense_floor: bool = True
    """Estimate the floor from semidense_points.csv.gz when it exists; else (or False) from the head height."""
    floor_band_m: float = 0.02
    """Half-height of the horizontal band whose points count as one surface, metres."""
    floor_min_support: float = 0.25
    """The floor is the lowest band holding at least this fraction of the densest band's points."""
    floor_min_points: int = 20
    """... and at least this many points (fewer: isolated points below the floor are noise)."""
    min_eye_height_m: float = 0.5
    """Only points this far below the median CPF height can be floor (excludes the ceiling and head-high shelves)."""
    standing_cpf_height_m: float | None = None
    """Head-height fallback: CPF height above the floor when standing; None -> the body model's (mean shape)."""

    def __post_init__(self) -> None:
        positive = ("max_gap_s", "max_gravity_spread_deg", "max_inverse_distance_std", "max_distance_std_m",
                    "floor_band_m", "min_eye_height_m")
        bad = {name: getattr(self, name) for name in positive if not getattr(self, name) > 0}
        if bad:
            raise ValueError(f"AriaConfig values must be positive, got {bad}; fix the --aria.* flags.")
        if not 0 < self.floor_min_support <= 1:
            raise ValueError(f"--aria.floor-min-support must be in (0, 1], got {self.floor_min_support}.")
        if self.floor_min_points < 1:
            raise ValueError(f"--aria.floor-min-points must be >= 1, got {self.floor_min_points}.")
        if self.standing_cpf_height_m is not None and not self.standing_cpf_height_m > 0:
            raise ValueError(f"--aria.standing-cpf-height-m must be positive, got {self.standing_cpf_height_m}.")


def _projectaria():
    """The ``projectaria_tools.core`` package, imported on first use (the core install does not need it)."""
    try:
        from projectaria_tools import core
        from projectaria_tools.core import calibration, mps  # noqa: F401  (submodules used through `core`)
    except ImportError as error:
        raise ImportError(f"reading Aria MPS outputs needs projectaria-tools, which is not installed: "
                          f"{ARIA_EXTRA_HINT}.") from error
    return core


# ---------------------------------------------------------------------------------------------
# CSV checks shared by both readers


@contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    with (gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")) as f:
        yield f


def _check_csv(path: Path, required: tuple[str, ...]) -> int:
    """Raise unless ``path`` exists and its header has every ``required`` column; returns the number of data rows."""
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}; pass the MPS output folder that holds {path.name}.")
    with _open_text(path) as f:
        header = next(csv.reader(f), [])
        num_rows = sum(1 for line in f if line.strip())
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing} (it has {header}); projectaria-tools needs "
                         f"{list(required)}. Is this the right MPS file, written by a current MPS version?")
    return num_rows


def _describe_bad_row(path: Path, row: int, numeric: tuple[str, ...]) -> str:
    """Which numeric columns of data row ``row`` (0-based) are not finite numbers, for an error message."""
    with _open_text(path) as f:
        for i, values in enumerate(csv.DictReader(f)):
            if i == row:
                bad = {}
                for column in numeric:
                    try:
                        ok = math.isfinite(float(values[column]))
                    except (TypeError, ValueError):
                        ok = False
                    if not ok:
                        bad[column] = values[column]
                return f"values that are NaN or not numbers: {bad}" if bad else "a malformed line"
    return "a malformed line"


def _check_parsed_all(path: Path, parsed: int, expected: int, numeric: tuple[str, ...]) -> None:
    if parsed != expected:
        raise ValueError(f"{path}: projectaria-tools stopped after {parsed} of {expected} rows; data row {parsed} "
                         f"(file line {parsed + 2}) has {_describe_bad_row(path, parsed, numeric)}. Repair or drop "
                         "that row (MPS itself writes finite numbers).")


# ---------------------------------------------------------------------------------------------
# 1. Device trajectory


@dataclass(frozen=True)
class DeviceTrajectory:
    """The closed-loop device poses of one SLAM map, in file order (strictly increasing time)."""

    timestamps_us: Int[Tensor, " N"]
    """int64 ``tracking_timestamp_us``: the device clock, microseconds."""
    T_mps_device: Float[Tensor, "N 4 4"]
    """Device-to-MPS-world transforms, float64, metres."""
    gravity_mps: Float[Tensor, "N 3"]
    """``gravity_{x,y,z}_world``: gravity in the MPS world, m/s^2 (points down)."""
    graph_uid: str
    """The SLAM map these poses belong to."""


def read_closed_loop_trajectory(path: str | Path, graph_uid: str | None = None) -> DeviceTrajectory:
    """Read and validate an MPS ``closed_loop_trajectory.csv`` with projectaria-tools.

    Raises:
        ImportError: projectaria-tools is missing (names the ``aria`` extra).
        FileNotFoundError: no file.
        ValueError: missing columns; a row that is not numbers (e.g. a 'nan' quaternion); zero or NaN
            quaternions; non-finite positions or gravity; timestamps not strictly increasing; several
            SLAM maps and no ``graph_uid`` chosen (or an unknown one).
    """
    path = Path(path)
    num_rows = _check_csv(path, CLOSED_LOOP_COLUMNS)
    poses = _projectaria().mps.read_closed_loop_trajectory(str(path))
    _check_parsed_all(path, len(poses), num_rows, CLOSED_LOOP_COLUMNS[1:])
    if not poses:
        raise ValueError(f"{path} has no poses; MPS failed on this recording or the file is truncated.")
    uids = [p.graph_uid for p in poses]
    counts = dict(Counter(uids))
    if graph_uid is None and len(counts) > 1:
        raise ValueError(f"{path} holds {len(counts)} SLAM maps ({counts} poses each); their poses are in different "
                         "worlds. Choose one with --aria.graph-uid.")
    graph_uid = graph_uid if graph_uid is not None else uids[0]
    if graph_uid not in counts:
        raise ValueError(f"--aria.graph-uid {graph_uid!r} is not in {path}; it has {sorted(counts)}.")
    keep = np.array([uid == graph_uid for uid in uids])
    rows = np.flatnonzero(keep)
    q_and_t = np.array([p.transform_world_device.to_quat_and_translation()[0] for p in poses])[keep]  # (N, 7) wxyz xyz
    gravity = np.array([p.gravity_world for p in poses])[keep]
    timestamps_us = np.array([p.tracking_timestamp // _MICROSECOND for p in poses], dtype=np.int64)[keep]

    bad_q = rows[~np.isfinite(q_and_t[:, :4]).all(axis=1)]
    if bad_q.size:  # projectaria-tools turns a zero (or empty) quaternion into NaN
        raise ValueError(f"{path}: NaN or zero quaternion ({', '.join(QUATERNION_COLUMNS)}) in data row(s) "
                         f"{bad_q[:5].tolist()} (file line {int(bad_q[0]) + 2} first); drop or repair those rows.")
    for name, values in (("translation (t*_world_device)", q_and_t[:, 4:]), ("gravity (gravity_*_world)", gravity)):
        bad = rows[~np.isfinite(values).all(axis=1)]
        if bad.size:
            raise ValueError(f"{path}: non-finite {name} in data row(s) {bad[:5].tolist()}; drop or repair them.")
    step = np.diff(timestamps_us)
    if (step <= 0).any():
        i = int(np.flatnonzero(step <= 0)[0])
        raise ValueError(f"{path}: tracking_timestamp_us is not strictly increasing: data row {rows[i + 1]} "
                         f"({timestamps_us[i + 1]} us) follows row {rows[i]} ({timestamps_us[i]} us). Sort the rows "
                         "by time and drop duplicates.")
    q = torch.from_numpy(q_and_t[:, :4])
    T_mps_device = make_transform(quaternion_to_matrix(q), torch.from_numpy(q_and_t[:, 4:]))
    return DeviceTrajectory(torch.from_numpy(timestamps_us), T_mps_device, torch.from_numpy(gravity), graph_uid)


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
# 5. Floor


@dataclass(frozen=True)
class FloorEstimate:
    """Height of the floor along the gravity-aligned +Z axis."""

    floor_z_m: float
    """Floor height in the gravity-aligned MPS world (before the shift), metres."""
    method: Literal["semidense_points", "head_height"]
    num_inliers: int
    """Points within the floor band (0 for the head-height fallback)."""
    num_candidates: int
    """Points low enough to be floor (0 for the head-height fallback)."""


def read_semidense_points(
    path: str | Path,
    graph_uid: str,
    max_inverse_distance_std: float = 0.001,
    max_distance_std_m: float = 0.05,
) -> Float[Tensor, "P 3"]:
    """Confidently placed semi-dense points of one SLAM map, MPS world metres (float64).

    Read by projectaria-tools' ``read_global_point_cloud``, filtered by its
    ``filter_points_from_confidence`` (inverse-distance and distance standard deviations).

    Raises:
        ValueError: missing columns, an unparsable row, or no point of ``graph_uid`` passes the filter.
    """
    path = Path(path)
    num_rows = _check_csv(path, SEMIDENSE_COLUMNS)
    core = _projectaria()
    points = core.mps.read_global_point_cloud(str(path))
    _check_parsed_all(path, len(points), num_rows, SEMIDENSE_COLUMNS[2:])
    points = [p for p in points if p.graph_uid == graph_uid]
    kept = core.mps.utils.filter_points_from_confidence(points, max_inverse_distance_std, max_distance_std_m)
    if not kept:
        raise ValueError(f"{path}: none of the {len(points)} points of map {graph_uid!r} passes the confidence filter "
                         f"(inv_dist_std < {max_inverse_distance_std}, dist_std < {max_distance_std_m} m); loosen "
                         "--aria.max-inverse-distance-std / --aria.max-distance-std-m or pass "
                         "--aria.no-use-semidense-floor.")
    return torch.from_numpy(np.array([p.position_world for p in kept], dtype=np.float64).reshape(-1, 3))


def estimate_floor_height(
    point_z_m: Float[Tensor, " P"], cpf_z_m: Float[Tensor, " L"], cfg: AriaConfig
) -> FloorEstimate:
    """The lowest well-supported horizontal surface below the head: a robust 1-D estimate of the floor height.

    Why not the lowest point: SLAM leaves a few points below the floor (reflections, noise); why not
    the densest band: a table top or a bed can hold more points than the floor. Steps, on the heights
    z (+Z up, any origin):
    1. candidates: points more than ``min_eye_height_m`` below the median CPF height;
    2. support n(z_i) = number of candidates within +-``floor_band_m`` of z_i (every point is a
       1-D RANSAC hypothesis, so the search is exhaustive and deterministic);
    3. the floor band is centred on the lowest z_i with n(z_i) >= ``floor_min_support`` x max n and
       >= ``floor_min_points``; the estimate is the median of the points in that band.

    Raises:
        ValueError: no band has enough support (too few points below the head).
    """
    head_z = float(cpf_z_m.median())
    z = torch.sort(point_z_m[point_z_m < head_z - cfg.min_eye_height_m].to(torch.float64)).values  # (P',)
    support = (torch.searchsorted(z, z + cfg.floor_band_m, right=True)
               - torch.searchsorted(z, z - cfg.floor_band_m, right=False))  # (P',)
    needed = max(cfg.floor_min_points, math.ceil(cfg.floor_min_support * (int(support.max()) if len(z) else 0)))
    good = torch.nonzero(support >= needed)
    if len(good) == 0:
        raise ValueError(f"only {len(z)} semi-dense points lie {cfg.min_eye_height_m} m below the median head "
                         f"height and no {2 * cfg.floor_band_m} m band holds {cfg.floor_min_points} of them; "
                         "the floor was not mapped. Pass --aria.no-use-semidense-floor to use the head height.")
    z_band = z[int(good[0])]
    inliers = z[(z - z_band).abs() <= cfg.floor_band_m]
    floor_z = float(inliers.median())
    _warn_if_implausible(head_z - floor_z, "semi-dense points")
    return FloorEstimate(floor_z, "semidense_points", len(inliers), len(z))


def standing_cpf_height_m(body: BodyModel) -> float:
    """CPF height above the soles of the body model's mean shape standing in its zero pose, metres.

    Height = y of (head joint + CPF offset) minus the lowest mesh vertex's y, in the model frame
    (+Y up), betas = 0: 1.59 m for the bundled skeleton model.
    """
    betas = torch.zeros(body.num_betas, dtype=body.J_template.dtype)
    cpf_y = body.shaped_joints(betas)[HEAD_JOINT, 1] + body.T_head_cpf(betas)[1, 3]
    layer = body.smplx_layer
    sole_y = (layer.v_template + torch.einsum("vcb,b->vc", layer.shapedirs, betas))[:, 1].min()
    return float(cpf_y - sole_y)


def floor_from_head_height(cpf_z_m: Float[Tensor, " L"], standing_height_m: float) -> FloorEstimate:
    """Fallback without semi-dense points: floor = median CPF height - the standing CPF height.

    Assumes the wearer stands or walks for at least half of the recording and has the standing
    eye height given (sitting most of the time puts the floor too high, a taller wearer too low:
    expect errors of 0.1-0.2 m; the bundled test clips' median CPF heights span 1.44-1.80 m).
    """
    floor_z = float(cpf_z_m.median()) - standing_height_m
    logger.warning("no semi-dense points used: floor set %.2f m below the median head height (assumes a standing "
                   "wearer); pass the MPS semidense_points.csv.gz for a measured floor", standing_height_m)
    return FloorEstimate(floor_z, "head_height", 0, 0)


def _warn_if_implausible(median_cpf_height_m: float, source: str) -> None:
    if not 1.0 <= median_cpf_height_m <= 2.1:
        logger.warning("floor from %s puts the median head height %.2f m above it (a standing adult: 1.4-1.8 m); "
                       "check the floor before trusting the body's height", source, median_cpf_height_m)


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
