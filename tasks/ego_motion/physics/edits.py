"""Non-physical edits of a motion: what the physics measures must tell from the motion itself.

Each edit takes a motion as ``EgoMotionTask.decode`` gives it (pelvis poses ``T_world_root`` (T, 4, 4),
world, metres, +Z up, floor z = 0; local rotations ``body_rotmats`` (T, 21, 3, 3)) and returns the
edited pair. A real capture that touches the floor executes; each edit breaks one physical law:
support (lifted), balance (leaned), continuity (shuffled), friction (slid) or the floor's
impenetrability (sunk). ``recipes/benchmarks/bench_physics.py`` and the tests score them.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..body.geometry import axis_angle_to_matrix

Motion = tuple[Float[Tensor, "T 4 4"], Float[Tensor, "T 21 3 3"]]


def lifted(T_world_root: Tensor, body_rotmats: Tensor, height_m: float = 0.3) -> Motion:
    """The whole motion raised by ``height_m`` (m): it floats."""
    out = T_world_root.clone()
    out[:, 2, 3] += height_m
    return out, body_rotmats


def sunk(T_world_root: Tensor, body_rotmats: Tensor, depth_m: float = 0.05) -> Motion:
    """The whole motion lowered by ``depth_m`` (m): its feet go into the floor."""
    return lifted(T_world_root, body_rotmats, -depth_m)


def sunk_below_contact(T_world_root: Tensor, body_rotmats: Tensor, contact_height_m: float,
                       depth_m: float = 0.05) -> Motion:
    """The whole motion lowered until its feet's contact height is ``depth_m`` (m) under the floor: sunk like
    :func:`sunk`, but from where this capture's feet meet its floor, ``contact_height_m`` (m,
    ``criterion.contact_height_m``), rather than from z = 0. A capture whose feet float 5 cm is sunk back to the floor
    by :func:`sunk` (as physical as the original); this edit puts its feet into the floor whatever it floated.

    Raises:
        ValueError: ``contact_height_m`` or ``depth_m`` not finite.
    """
    if not (math.isfinite(contact_height_m) and math.isfinite(depth_m)):
        raise ValueError(f"contact_height_m and depth_m must be finite, got {contact_height_m!r} and {depth_m!r}.")
    return lifted(T_world_root, body_rotmats, -(contact_height_m + depth_m))


def leaned(T_world_root: Tensor, body_rotmats: Tensor, max_angle_rad: float = math.radians(60.0)) -> Motion:
    """The motion tilted forward about world x around its ground point (the pelvis projected on z = 0),
    0 -> ``max_angle_rad`` linearly over the window: it falls over without falling."""
    angles = torch.linspace(0.0, max_angle_rad, T_world_root.shape[0], dtype=T_world_root.dtype)
    R = axis_angle_to_matrix(torch.stack([angles, 0 * angles, 0 * angles], -1))
    pivot = T_world_root[:, :3, 3].clone()
    pivot[:, 2] = 0.0
    out = T_world_root.clone()
    out[:, :3, :3] = R @ T_world_root[:, :3, :3]
    out[:, :3, 3] = (R @ (T_world_root[:, :3, 3] - pivot)[..., None])[..., 0] + pivot
    return out, body_rotmats


def shuffled(T_world_root: Tensor, body_rotmats: Tensor, seed: int = 0) -> Motion:
    """The frames in a random order (seeded): it teleports."""
    order = torch.randperm(T_world_root.shape[0], generator=torch.Generator().manual_seed(seed))
    return T_world_root[order], body_rotmats[order]


def slid(T_world_root: Tensor, body_rotmats: Tensor, speed_m_per_s: float = 1.0, fps: float = 30.0) -> Motion:
    """The whole motion drifting along world +x at ``speed_m_per_s``: feet that stood still slide."""
    out = T_world_root.clone()
    out[:, 0, 3] += speed_m_per_s * torch.arange(T_world_root.shape[0], dtype=T_world_root.dtype) / fps
    return out, body_rotmats


EDITS = {"lifted 0.3 m": lifted, "leaned 0->60 deg": leaned, "frames shuffled": shuffled,
         "slid 1 m/s": slid, "sunk 5 cm": sunk}
"""The edits the benchmark and the tests score, by the name the tables use (:func:`sunk_below_contact`, which needs
the capture's contact height, is scored beside them by the benchmark)."""
