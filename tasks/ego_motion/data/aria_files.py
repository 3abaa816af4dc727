"""Reading a Project Aria recording's MPS files (the closed-loop trajectory, the semi-dense points), and the
settings of the whole recording -> head trajectory conversion (``AriaConfig``).

Why apart from the geometry (``aria.py``): ``projectaria-tools`` (optional: ``pip install -e '.[aria]'``)
reads the files, but its readers print a message and return what they parsed so far when a row is bad,
so each file's header and row count are checked here first, and a short row is diagnosed with Python's
``csv`` module. What the poses and points mean, and how they become the prior's head trajectory, is
``aria.py``'s.
"""

from __future__ import annotations

import csv
import gzip
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

from tasks.ego_motion.body.geometry import (
    make_transform,
    quaternion_to_matrix,
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
