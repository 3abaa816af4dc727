"""A small BVH (Biovision Hierarchy) reader with vectorised forward kinematics, in numpy.

Why our own: the CMU clips need only HIERARCHY (ROOT/JOINT/End Site, OFFSET, CHANNELS in any
order) and MOTION (Frames, Frame Time, one row of channel values per frame). On PyPI, ``bvh``
(0.3, 2017) parses the text but computes no transforms, and ``bvhio`` (maintained) computes them
through a per-joint object hierarchy; what the converter needs is the global rotation and
position of every joint for every frame as arrays, which is a short numpy loop over joints, so
we keep this small reader and add no dependency.

Conventions: Euler angles are in degrees and applied intrinsically in the order listed, so
``Zrotation Yrotation Xrotation`` means R = Rz(a) @ Ry(b) @ Rx(c). A joint's local transform is
translation(OFFSET + position channels) @ rotation; global = parent global @ local. Units are
whatever the file uses (the caller scales). End Sites become joints named ``<parent>_End``
without channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class BvhSkeleton:
    """Joint hierarchy. names/parents/offsets are per joint (End Sites included); parents[0] = -1.

    offsets: (J, 3) in file units. channels: per joint, the channel names in file order.
    channel_start: per joint, the index of its first channel in a MOTION row.
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    offsets: np.ndarray
    channels: tuple[tuple[str, ...], ...]
    channel_start: tuple[int, ...]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"joint {name!r} not in the BVH hierarchy; it has {list(self.names)}") from None


@dataclass(frozen=True)
class BvhMotion:
    """A parsed BVH file: skeleton, frame time in seconds and the (F, C) channel values."""

    skeleton: BvhSkeleton
    frame_time_s: float
    values: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.values.shape[0])

    @property
    def fps(self) -> float:
        return 1.0 / self.frame_time_s


@dataclass(frozen=True)
class BvhGlobalPoses:
    """Global joint frames per frame in the file's world frame: R (F, J, 3, 3), t (F, J, 3) in file units."""

    R_world_joint: np.ndarray
    t_world_joint: np.ndarray


def _axis_rotation(axis: str, angle_rad: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    o, z = np.ones_like(c), np.zeros_like(c)
    rows = {
        "X": [o, z, z, z, c, -s, z, s, c],
        "Y": [c, z, s, z, o, z, -s, z, c],
        "Z": [c, -s, z, s, c, z, z, z, o],
    }[axis]
    return np.stack(rows, axis=-1).reshape(*angle_rad.shape, 3, 3)


def parse_bvh(path: str | Path) -> BvhMotion:
    """Read a BVH file. Raises ValueError naming the line for malformed input."""
    path = Path(path)
    tokens_by_line = [line.split() for line in path.read_text().splitlines()]
    names: list[str] = []
    parents: list[int] = []
    offsets: list[list[float]] = []
    channels: list[tuple[str, ...]] = []
    channel_start: list[int] = []
    stack: list[int] = []
    num_channels = 0
    pending_parent = -1
    i = 0
    while i < len(tokens_by_line):
        tok = tokens_by_line[i]
        i += 1
        if not tok or tok[0] == "HIERARCHY":
            continue
        key = tok[0]
        if key in ("ROOT", "JOINT"):
            if len(tok) < 2:
                raise ValueError(f"{path}:{i}: {key} without a name")
            names.append(" ".join(tok[1:]))
            parents.append(stack[-1] if stack else -1)
            offsets.append([0.0, 0.0, 0.0])
            channels.append(())
            channel_start.append(num_channels)
            pending_parent = len(names) - 1
        elif key == "End":
            if not stack:
                raise ValueError(f"{path}:{i}: End Site outside a joint")
            names.append(f"{names[stack[-1]]}_End")
            parents.append(stack[-1])
            offsets.append([0.0, 0.0, 0.0])
            channels.append(())
            channel_start.append(num_channels)
            pending_parent = len(names) - 1
        elif key == "{":
            stack.append(pending_parent)
        elif key == "}":
            if not stack:
                raise ValueError(f"{path}:{i}: unbalanced '}}'")
            stack.pop()
        elif key == "OFFSET":
            offsets[stack[-1]] = [float(v) for v in tok[1:4]]
        elif key == "CHANNELS":
            n = int(tok[1])
            chans = tuple(tok[2 : 2 + n])
            if len(chans) != n:
                raise ValueError(f"{path}:{i}: CHANNELS announces {n} channels, lists {len(chans)}")
            channels[stack[-1]] = chans
            channel_start[stack[-1]] = num_channels
            num_channels += n
        elif key == "MOTION":
            break
        else:
            raise ValueError(f"{path}:{i}: unexpected token {key!r} in HIERARCHY")
    if stack or not names:
        raise ValueError(f"{path}: HIERARCHY is empty or its braces are unbalanced")
    header: dict[str, str] = {}
    while i < len(tokens_by_line) and len(header) < 2:
        line = " ".join(tokens_by_line[i])
        i += 1
        if ":" in line:
            k, v = line.split(":", 1)
            header[k.strip()] = v.strip()
    if "Frames" not in header or "Frame Time" not in header:
        raise ValueError(f"{path}: MOTION section lacks 'Frames:' or 'Frame Time:'")
    num_frames = int(header["Frames"])
    frame_time_s = float(header["Frame Time"])
    rows = [t for t in tokens_by_line[i:] if t]
    if len(rows) < num_frames:
        raise ValueError(f"{path}: header says {num_frames} frames, file has {len(rows)} rows")
    values = np.array([[float(v) for v in r] for r in rows[:num_frames]], dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != num_channels:
        raise ValueError(
            f"{path}: frame rows have {values.shape[-1]} values, hierarchy declares {num_channels}"
        )
    skeleton = BvhSkeleton(
        names=tuple(names),
        parents=tuple(parents),
        offsets=np.array(offsets),
        channels=tuple(channels),
        channel_start=tuple(channel_start),
    )
    return BvhMotion(skeleton=skeleton, frame_time_s=frame_time_s, values=values)


def global_poses(motion: BvhMotion, frames: slice | np.ndarray | None = None) -> BvhGlobalPoses:
    """Global rotations and positions of every joint for the selected frames (all by default)."""
    sk = motion.skeleton
    values = motion.values if frames is None else motion.values[frames]
    F = values.shape[0]
    J = len(sk.names)
    R = np.zeros((F, J, 3, 3))
    t = np.zeros((F, J, 3))
    for j in range(J):
        local_t = np.broadcast_to(sk.offsets[j], (F, 3)).copy()
        local_R = np.broadcast_to(np.eye(3), (F, 3, 3)).copy()
        for k, ch in enumerate(sk.channels[j]):
            col = values[:, sk.channel_start[j] + k]
            axis, kind = ch[0].upper(), ch[1:].lower()
            if kind == "position":
                local_t[:, "XYZ".index(axis)] += col
            elif kind == "rotation":
                local_R = local_R @ _axis_rotation(axis, np.deg2rad(col))
            else:
                raise ValueError(f"unknown BVH channel {ch!r} on joint {sk.names[j]!r}")
        p = sk.parents[j]
        if p < 0:
            R[:, j], t[:, j] = local_R, local_t
        else:
            R[:, j] = R[:, p] @ local_R
            t[:, j] = t[:, p] + (R[:, p] @ local_t[..., None])[..., 0]
    return BvhGlobalPoses(R_world_joint=R, t_world_joint=t)


def positions_relative_to_offsets(motion: BvhMotion, *, max_deviation: float) -> BvhMotion:
    """``motion`` with each non-root joint's OFFSET subtracted from its position channels.

    Why: Blender's exporter (the ReActIdle files) writes a child joint's position channels as its
    whole local translation, OFFSET included, while this reader adds them to OFFSET, which would
    double every such bone. The root is left alone (its channels move it from its OFFSET there too).
    max_deviation (file units): a child position channel farther than this from its OFFSET in any
    frame means the file does not follow that convention, so ValueError.
    """
    sk = motion.skeleton
    values = motion.values.copy()
    for j in range(1, len(sk.names)):
        for k, ch in enumerate(sk.channels[j]):
            if ch[1:].lower() != "position":
                continue
            col = sk.channel_start[j] + k
            values[:, col] -= sk.offsets[j, "XYZ".index(ch[0].upper())]
            worst = float(np.abs(values[:, col]).max())
            if worst > max_deviation:
                raise ValueError(
                    f"joint {sk.names[j]!r} channel {ch} is up to {worst:.4g} away from its OFFSET "
                    f"(allowed {max_deviation:.4g}): these position channels are not whole local "
                    f"translations, so this rig's SkeletonVariant should not set "
                    f"child_positions_include_offset."
                )
    return BvhMotion(skeleton=sk, frame_time_s=motion.frame_time_s, values=values)
