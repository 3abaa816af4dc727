"""The conditioning signal g(head trajectory) of the ego-motion prior (docs/ego_motion_prior.md).

Why this encoding: the headset only tells us where the wearer's head is, and the body that
produced a head trajectory does not depend on which way the world's x axis points or where the
walk started on the floor. Every number below is therefore invariant to a rotation of the whole
trajectory about world +Z and to a horizontal translation of it, so the prior never has to learn
that symmetry from data. Height above the floor and the head's pitch/roll are *not* invariant
(gravity and the floor are real), and they are kept.

Frames and units: ``T_world_cpf[t]`` maps points in the central pupil frame (CPF) at frame t to
the world frame (world +Z up, floor at z = 0, metres). The CPF looks along its local +Z axis.

Raw channels per frame t (needs frames t - 1 and t, so T + 1 poses give T frames), 22 numbers:

- ``RAW_RELATIVE_POSE`` = [0, 12): ``inv(T_world_cpf[t-1]) @ T_world_cpf[t]``, its top 3x4
  block [R | t] row-major (r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2); the translation is in
  metres, expressed in the CPF frame at t - 1.
- ``RAW_CPF_HEIGHT`` = [12, 13): z of the CPF position at t, metres above the floor.
- ``RAW_CPF_ROTATION_NO_YAW`` = [13, 22): ``Rz(-psi) @ R_world_cpf[t]`` row-major, with
  ``f = R_world_cpf[t] @ (0, 0, 1)`` and ``psi = atan2(f_y, f_x)``; its forward axis lies in the
  world x-z half-plane with x >= 0.

Encoded features (154 = 22 + 22 * 3 * 2), in this exact order along the last axis:

- ``[0, 22)``: the 22 raw channels x_i unchanged;
- ``[22, 88)``: sin(c_k * x_i) at index ``22 + 3 * i + k``;
- ``[88, 154)``: cos(c_k * x_i) at index ``88 + 3 * i + k``;

with frequencies ``c = FOURIER_FREQUENCIES = (1, 2, 4)`` and k in 0..2 (channel-major,
frequency-minor inside each block).

Degenerate case: when the CPF looks straight up or down, f has no horizontal part and psi is
atan2(~0, ~0), so yaw invariance of the rotation channels holds only up to that ill-defined yaw.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tasks.ego_motion.body.geometry import invert_transform, rotation_about_z

RAW_RELATIVE_POSE = slice(0, 12)
"""Raw channels holding ``inv(T_world_cpf[t-1]) @ T_world_cpf[t]`` as a row-major 3x4 [R | t]."""
RAW_CPF_HEIGHT = slice(12, 13)
"""Raw channel holding the CPF height above the floor (world z of the CPF position), metres."""
RAW_CPF_ROTATION_NO_YAW = slice(13, 22)
"""Raw channels holding the yaw-free CPF rotation ``Rz(-psi) @ R_world_cpf`` row-major."""
NUM_RAW_CHANNELS = 22

FOURIER_FREQUENCIES: tuple[float, ...] = (1.0, 2.0, 4.0)
"""Multipliers c in sin(c * x), cos(c * x) of the Fourier encoding."""
NUM_CONDITION_FEATURES = NUM_RAW_CHANNELS * (1 + 2 * len(FOURIER_FREQUENCIES))  # 154

ENCODED_RAW = slice(0, NUM_RAW_CHANNELS)
"""Encoded features that are the raw channels unchanged."""
ENCODED_SIN = slice(NUM_RAW_CHANNELS, NUM_RAW_CHANNELS * (1 + len(FOURIER_FREQUENCIES)))
"""Encoded features sin(c_k * x_i), channel-major: offset ``3 * i + k`` inside the slice."""
ENCODED_COS = slice(ENCODED_SIN.stop, NUM_CONDITION_FEATURES)
"""Encoded features cos(c_k * x_i), channel-major: offset ``3 * i + k`` inside the slice."""


def _validate_T_world_cpf(T_world_cpf: Tensor) -> None:
    if not isinstance(T_world_cpf, Tensor) or not T_world_cpf.is_floating_point():
        raise TypeError(
            f"T_world_cpf must be a floating-point torch.Tensor, got "
            f"{type(T_world_cpf).__name__} {getattr(T_world_cpf, 'dtype', '')}; convert with .float()."
        )
    if T_world_cpf.ndim < 3 or tuple(T_world_cpf.shape[-2:]) != (4, 4):
        raise ValueError(
            f"T_world_cpf must have shape (..., T+1, 4, 4) (homogeneous transforms), got "
            f"{tuple(T_world_cpf.shape)}; build them with geometry.make_transform(R, t)."
        )
    if T_world_cpf.shape[-3] < 2:
        raise ValueError(
            f"T_world_cpf has {T_world_cpf.shape[-3]} pose(s) along the time axis (dim -3); the "
            "relative pose needs frames t-1 and t, so pass at least 2 (T+1 poses give T frames)."
        )
    if not torch.isfinite(T_world_cpf).all():
        raise ValueError(
            "T_world_cpf contains NaN or infinite values; drop or interpolate the invalid head "
            "poses before encoding."
        )
    bottom = T_world_cpf[..., 3, :]
    expected = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=bottom.dtype, device=bottom.device)
    if not torch.allclose(bottom, expected.expand_as(bottom), atol=1e-5):
        raise ValueError(
            "T_world_cpf's bottom rows are not (0, 0, 0, 1): these are not homogeneous transforms "
            "(a transposed matrix puts the translation there); pass T_world_cpf, not its transpose."
        )


def raw_head_features(
    T_world_cpf: Float[Tensor, "*batch timesteps_plus_1 4 4"],
) -> Float[Tensor, "*batch timesteps 22"]:
    """The 22 yaw- and horizontal-translation-invariant numbers per frame (layout in the module doc).

    Why separate from the encoding: tests, perturbation diagnostics and plots read the raw
    channels by name through ``RAW_RELATIVE_POSE``, ``RAW_CPF_HEIGHT`` and
    ``RAW_CPF_ROTATION_NO_YAW``.

    Args:
        T_world_cpf: (..., T+1, 4, 4) rigid CPF-to-world transforms, metres, world +Z up.

    Returns:
        (..., T, 22); frame t of the output uses input poses t and t+1.
    """
    _validate_T_world_cpf(T_world_cpf)
    T_world_prev = T_world_cpf[..., :-1, :, :]  # (..., T, 4, 4)
    T_world_curr = T_world_cpf[..., 1:, :, :]  # (..., T, 4, 4)
    T_prev_curr = invert_transform(T_world_prev) @ T_world_curr  # (..., T, 4, 4)
    relative_pose = T_prev_curr[..., :3, :].flatten(-2)  # (..., T, 12)

    height_m = T_world_curr[..., 2, 3:4]  # (..., T, 1)

    R_world_cpf = T_world_curr[..., :3, :3]  # (..., T, 3, 3)
    forward_world = R_world_cpf[..., :, 2]  # (..., T, 3), the CPF's local +Z in the world
    yaw_rad = torch.atan2(forward_world[..., 1], forward_world[..., 0])  # (..., T)
    R_no_yaw = rotation_about_z(-yaw_rad) @ R_world_cpf  # (..., T, 3, 3)
    return torch.cat([relative_pose, height_m, R_no_yaw.flatten(-2)], dim=-1)


def fourier_encode(
    x: Float[Tensor, "*batch channels"],
    frequencies: tuple[float, ...] = FOURIER_FREQUENCIES,
) -> Float[Tensor, "*batch encoded"]:
    """[x, sin(c * x), cos(c * x)] along the last axis, channel-major inside the sin and cos blocks.

    Why: the transformer sees sharper functions of the head motion (e.g. small relative
    rotations) than a linear input layer alone would give it.

    Args:
        x: (..., C) any real values.
        frequencies: the F multipliers c_k.

    Returns:
        (..., C * (1 + 2F)): out[..., :C] = x; out[..., C + F*i + k] = sin(c_k x_i);
        out[..., C + C*F + F*i + k] = cos(c_k x_i).
    """
    if len(frequencies) == 0:
        raise ValueError("fourier_encode needs at least one frequency; pass e.g. (1.0, 2.0, 4.0).")
    c = torch.tensor(frequencies, dtype=x.dtype, device=x.device)  # (F,)
    scaled = (x[..., :, None] * c).flatten(-2)  # (..., C*F), channel-major
    return torch.cat([x, torch.sin(scaled), torch.cos(scaled)], dim=-1)


def encode_head_trajectory(
    T_world_cpf: Float[Tensor, "*batch timesteps_plus_1 4 4"],
) -> Float[Tensor, "*batch timesteps 154"]:
    """The condition g fed to the denoiser: Fourier-encoded raw head features (docs/ego_motion_prior.md).

    Args:
        T_world_cpf: (..., T+1, 4, 4) rigid CPF-to-world transforms, metres, world +Z up,
            floor at z = 0; any leading batch axes; T+1 >= 2; finite.

    Returns:
        (..., T, 154) features; ordering in the module docstring (``ENCODED_RAW``,
        ``ENCODED_SIN``, ``ENCODED_COS``). Invariant to rotating the whole trajectory about
        world +Z and translating it horizontally.

    Raises:
        ValueError: wrong shape, fewer than 2 poses, NaN/inf, or bottom row not (0, 0, 0, 1).
    """
    return fourier_encode(raw_head_features(T_world_cpf), FOURIER_FREQUENCIES)
