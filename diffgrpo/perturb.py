"""Condition perturbations: Gaussian and temporally smooth Perlin noise on (..., T, D) tensors.

Why: with a strongly constraining condition (a head trajectory) the G samples of a group are
nearly identical and GRPO's group std collapses; giving each member a slightly different but
plausible condition spreads the group (docs/ego_motion_grpo.md). Perlin noise keeps the perturbed
trajectory smooth in time; white Gaussian noise is the contrast that breaks smoothness.

`pnoise1` is a batched torch port of `noise.pnoise1` (noise 1.2.2, `_perlin.c`) that reproduces
it bit for bit in float32, so that training can use it on any device and batch shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from diffgrpo.registry import Registry, parse_assignments

# Ken Perlin's reference permutation of 0..255 ("Improved Noise", 2002), as used by noise 1.2.2.
# The C source stores it twice (512 entries) so that `PERM[(i & 255) + base]` stays in bounds
# for 0 <= base <= 256.
_PERM_256: tuple[int, ...] = (
    151, 160, 137, 91, 90, 15, 131, 13, 201, 95, 96, 53, 194, 233, 7, 225, 140, 36, 103, 30, 69,
    142, 8, 99, 37, 240, 21, 10, 23, 190, 6, 148, 247, 120, 234, 75, 0, 26, 197, 62, 94, 252, 219,
    203, 117, 35, 11, 32, 57, 177, 33, 88, 237, 149, 56, 87, 174, 20, 125, 136, 171, 168, 68, 175,
    74, 165, 71, 134, 139, 48, 27, 166, 77, 146, 158, 231, 83, 111, 229, 122, 60, 211, 133, 230,
    220, 105, 92, 41, 55, 46, 245, 40, 244, 102, 143, 54, 65, 25, 63, 161, 1, 216, 80, 73, 209, 76,
    132, 187, 208, 89, 18, 169, 200, 196, 135, 130, 116, 188, 159, 86, 164, 100, 109, 198, 173, 186,
    3, 64, 52, 217, 226, 250, 124, 123, 5, 202, 38, 147, 118, 126, 255, 82, 85, 212, 207, 206, 59,
    227, 47, 16, 58, 17, 182, 189, 28, 42, 223, 183, 170, 213, 119, 248, 152, 2, 44, 154, 163, 70,
    221, 153, 101, 155, 167, 43, 172, 9, 129, 22, 39, 253, 19, 98, 108, 110, 79, 113, 224, 232, 178,
    185, 112, 104, 218, 246, 97, 228, 251, 34, 242, 193, 238, 210, 144, 12, 191, 179, 162, 241, 81,
    51, 145, 235, 249, 14, 239, 107, 49, 192, 214, 31, 181, 199, 106, 157, 184, 84, 204, 176, 115,
    121, 50, 45, 127, 4, 150, 254, 138, 236, 205, 93, 222, 114, 67, 29, 24, 72, 243, 141, 128, 195,
    78, 66, 215, 61, 156, 180,
)
_PERM: tuple[int, ...] = _PERM_256 + _PERM_256
_INT32_LIMIT = 2**31


def _f32(value: float) -> float:
    """The float32 value nearest to `value`, as a Python float (so torch rounds it exactly)."""
    return float(np.float32(value))


def _grad_coefficient(hash_value: int) -> float:
    """noise 1.2.2's 1-D gradient: (hash & 7) + 1, or -1 when bit 3 is set (not a negation)."""
    return -1.0 if hash_value & 8 else float((hash_value & 7) + 1)


@functools.lru_cache(maxsize=32)
def _grad_tables(base: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gradient lookups for a given `base`, (256,) each: g[k] = grad(PERM[k + base]) and its
    neighbour g[(k + 1) & 255], used when the lattice wraps every 256 cells."""
    grads = torch.tensor([_grad_coefficient(_PERM[k + base]) for k in range(256)], dtype=torch.float32)
    return grads.to(device), grads.roll(-1).to(device)


def _noise1(x: Tensor, repeat: int, base: int) -> Tensor:
    """One octave, float32, in the C source's exact operation order:
    n(x) = 0.4 * lerp(fade(f), g_i * f, g_ii * (f - 1)), f = x - floor(x),
    fade(f) = f^3 (f (6 f - 15) + 10), i = floor(x) % repeat (C truncated remainder),
    ii = (i + 1) % repeat, g_i = grad(PERM[(i & 255) + base]).
    In-place updates on fresh temporaries keep the per-op overhead low; the rounding sequence
    is the C one (no fused multiply-add anywhere)."""
    grads, grads_next = _grad_tables(base, x.device)
    cell = torch.floor(x)
    f = x - cell
    i = cell.to(torch.int32)  # C: (int)floorf(x)
    if repeat % 256 == 0:
        # Here (i % repeat) & 255 == i & 255 and ((i % repeat + 1) % repeat) & 255 == (i + 1) & 255,
        # so one index and the shifted table replace two remainders.
        i = i.bitwise_and_(255).flatten()
        g_i, g_ii = grads.index_select(0, i), grads_next.index_select(0, i)
    else:
        i = torch.fmod(i, repeat)  # C's `%`: the sign follows the dividend
        ii = torch.fmod(i + 1, repeat)
        g_i = grads.index_select(0, i.bitwise_and_(255).flatten())
        g_ii = grads.index_select(0, ii.bitwise_and_(255).flatten())
    g_i, g_ii = g_i.view_as(x), g_ii.view_as(x)
    poly = f * 6.0  # f * (f * 6 - 15) + 10
    poly.sub_(15.0).mul_(f).add_(10.0)
    fade = f * f  # f * f * f * poly
    fade.mul_(f).mul_(poly)
    a = g_i.mul_(f)  # grad(PERM[i], f)
    b = f - 1.0
    b.mul_(g_ii)  # grad(PERM[ii], f - 1)
    b.sub_(a).mul_(fade).add_(a)  # lerp(fade, a, b) = a + fade * (b - a)
    return b.mul_(_f32(0.4))


def pnoise1(
    x: Tensor,
    octaves: int = 1,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    repeat: int = 1024,
    base: int = 0,
) -> Float[Tensor, "..."]:
    """1-D Perlin noise of every element of `x`, equal to `noise.pnoise1` (noise 1.2.2) in float32.

    Why: the reference is a scalar C function; training needs the same values for whole
    (group, frame, axis) batches on the training device. Octaves follow the C loop:
    total = sum_o n(x * l^o, repeat=int(repeat * l^o)) * p^o, returned as total / sum_o p^o
    (l = lacunarity, p = persistence, every product rounded to float32 as in C). Like the
    reference, the noise is 0 at integer x and has period 256 cells when repeat is a multiple of
    256 (the default); otherwise its period is `repeat` on each side of 0 separately, because C's
    `%` truncates towards zero.

    Args:
        x: any shape, any device; converted to float32 first (as the C argument parser does).
        octaves: number of octaves, >= 1.
        persistence, lacunarity: amplitude and frequency factors between octaves.
        repeat: lattice period in cells before the 256-cell permutation wrap, >= 1.
        base: offset into the doubled permutation table, 0 <= base <= 256 (larger values read
            past the C table).

    Returns:
        float32 tensor shaped like `x`.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(octaves, bool) or not isinstance(octaves, int) or octaves < 1:
        raise ValueError(f"octaves={octaves!r} must be an int >= 1 (as noise.pnoise1 requires)")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat={repeat!r} must be an int >= 1 (it is a modulus in the C source)")
    if isinstance(base, bool) or not isinstance(base, int) or not 0 <= base <= 256:
        raise ValueError(f"base={base!r} must be an int in [0, 256] (it offsets a 512-entry table)")
    for label, value in (("persistence", persistence), ("lacunarity", lacunarity)):
        if not np.isfinite(value):
            raise ValueError(f"{label}={value!r} must be finite")
    x = x.to(torch.float32)
    if x.numel() == 0:
        return x.clone()
    # Per-octave constants, accumulated in float32 exactly like the C loop.
    freqs, amps, repeats = [], [], []
    freq, amp, norm = np.float32(1.0), np.float32(1.0), np.float32(0.0)
    for _ in range(octaves):
        octave_repeat = int(np.float32(repeat) * freq) if octaves > 1 else repeat
        if not 1 <= octave_repeat < _INT32_LIMIT:
            raise ValueError(
                f"repeat * lacunarity^o = {octave_repeat} for octave {len(freqs)} is outside [1, 2^31); "
                f"choose repeat={repeat} and lacunarity={lacunarity} so every octave's period is valid"
            )
        freqs.append(float(freq))
        amps.append(float(amp))
        repeats.append(octave_repeat)
        norm = np.float32(norm + amp)
        freq = np.float32(freq * np.float32(lacunarity))
        amp = np.float32(amp * np.float32(persistence))
    if norm == 0:
        raise ValueError(
            f"persistence={persistence} makes the {octaves} octave amplitudes sum to 0; the normalised "
            "noise is undefined"
        )
    x_min, x_max = torch.aminmax(x)  # one pass; NaN propagates
    largest = max(-float(x_min), float(x_max)) * max(abs(f) for f in freqs)
    if not np.isfinite(largest):
        raise ValueError("x contains NaN or inf; pnoise1 needs finite inputs")
    if largest >= _INT32_LIMIT:
        raise ValueError(
            f"|x| * lacunarity^(octaves-1) reaches {largest:.3g}, beyond the C int range 2^31 that "
            "noise.pnoise1 supports; reduce the input magnitude, lacunarity or octaves"
        )
    if octaves == 1:
        return _noise1(x, repeat, base)
    total = torch.zeros_like(x)
    for freq_o, amp_o, repeat_o in zip(freqs, amps, repeats, strict=True):
        total = total + _noise1(x * freq_o, repeat_o, base) * amp_o
    # Divide by a device tensor: CUDA turns division by a CPU scalar into a reciprocal multiply.
    return total / torch.tensor(float(norm), dtype=torch.float32, device=x.device)


# ----------------------------------------------------------------------------------------------
# Perturbers: (x (..., T, D), generator) -> x + scale * noise, noise varying along T.

Perturber = Callable[[Tensor, torch.Generator], Tensor]
_PERTURBERS: Registry[Callable[..., Perturber]] = Registry("perturber")


def register_perturber(name: str) -> Callable[[Callable[..., Perturber]], Callable[..., Perturber]]:
    """Register a perturber factory (keyword parameters -> perturber) under `name`."""
    return _PERTURBERS.register(name)


def available_perturbers() -> tuple[str, ...]:
    return _PERTURBERS.names()


def get_perturber(name: str, **kwargs: object) -> Perturber:
    """Build the perturber registered as `name` with `kwargs`.
    Raises KeyError for an unknown name and ValueError for unknown parameters, listing the options."""
    return _PERTURBERS.build(name, **kwargs)


@dataclass(frozen=True)
class PerturbConfig:
    """Per-member perturbation of the raw condition (MotionGRPO section 8)."""

    name: str = "none"
    """Perturber: a name in ``diffgrpo.perturb.available_perturbers()`` (built-ins: none, gaussian, perlin; a
    perturber registered with ``@register_perturber`` before the config is built is accepted too)."""
    scale: float = 0.0
    """lambda: amplitude of the added noise, in the raw condition's units."""
    frequency: float = 1.0 / 32.0
    """Perlin only: lattice cells per frame along the condition's time axis (about one smooth bump
    per cell: 1/32 gives a bump roughly every second at 30 fps)."""
    octaves: int = 1
    """Perlin only: number of octaves."""
    sharing: Literal["member", "group", "nested"] = "member"
    """Who shares a perturbed condition. member: each group member gets its own (the paper). group: all
    members see one perturbed condition. nested: ``heads_per_group`` perturbed conditions per group, each
    shared by G / heads_per_group members, and advantages normalised within each same-condition
    sub-group, so an advantage compares samples of one condition and never scores the perturbation."""
    heads_per_group: int = 2
    """nested only: P perturbed conditions per group (G must be a multiple of P, with G / P >= 2)."""
    params: tuple[str, ...] = ()
    """Further factory parameters of the perturber as KEY=VALUE, e.g. ``lacunarity=3.0`` for perlin; the
    fields above that the factory takes are passed under their own names (``perturb.perturber_from_config``)."""

    def __post_init__(self) -> None:
        if self.name not in available_perturbers():
            raise ValueError(f"perturb.name={self.name!r} is not one of {', '.join(map(repr, available_perturbers()))}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"perturb.scale must be >= 0, got {self.scale}")
        if self.name == "none" and self.scale != 0:
            raise ValueError(f"perturb.scale={self.scale} has no effect with perturb.name='none'; pick "
                             "--grpo.perturb.name perlin or gaussian, or drop the scale")
        if not math.isfinite(self.frequency) or self.frequency <= 0:
            raise ValueError(f"perturb.frequency must be > 0 (lattice cells per frame), got {self.frequency}")
        if self.octaves < 1:
            raise ValueError(f"perturb.octaves must be >= 1, got {self.octaves}")
        if self.sharing not in ("member", "group", "nested"):
            raise ValueError(f"perturb.sharing={self.sharing!r} is not one of 'member', 'group', 'nested'")
        if self.name != "perlin" and (self.frequency, self.octaves) != (1.0 / 32.0, 1):
            raise ValueError("perturb.frequency and perturb.octaves only apply to the perlin perturber; drop them or "
                             "pass --grpo.perturb.name perlin")
        if self.name == "none" and self.sharing != "member":
            raise ValueError(f"perturb.sharing={self.sharing!r} has no effect without a perturbation; drop it or pick "
                             "--grpo.perturb.name perlin or gaussian")
        perturber_from_config(self)  # the factory refuses parameters it does not take
        if self.sharing == "nested" and self.heads_per_group < 2:
            raise ValueError(f"perturb.heads_per_group={self.heads_per_group} must be >= 2 for sharing 'nested' "
                             "(1 is sharing 'group')")
        if self.sharing != "nested" and self.heads_per_group != 2:
            raise ValueError(f"perturb.heads_per_group={self.heads_per_group} is only used with --grpo.perturb.sharing "
                             "nested; set that or drop the flag")


def perturber_from_config(cfg: PerturbConfig) -> Perturber:
    """The perturber ``cfg.name`` of a :class:`PerturbConfig`, by the registry's one rule
    (``Registry.build_from_config``): the config fields the factory takes (perlin: scale, frequency, octaves;
    gaussian: scale; none: nothing) under their own names, plus ``cfg.params`` (KEY=VALUE strings).

    Raises:
        KeyError: an unknown ``cfg.name``; ValueError: a parameter the factory does not take, or a bad value.
    """
    extra = parse_assignments(cfg.params, "perturb.params")
    return _PERTURBERS.build_from_config(cfg.name, cfg, extra)


def _check_condition(x: Tensor, channels: tuple[int, ...] | None) -> tuple[int, ...]:
    """Validate a (..., T, D) condition and return the channel indices to perturb."""
    if not isinstance(x, Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(
            f"x must be a floating tensor shaped (..., T, D); got "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values; perturbers need a finite condition tensor")
    num_channels = x.shape[-1]
    if channels is None:
        return tuple(range(num_channels))
    if any(not -num_channels <= c < num_channels for c in channels):
        raise ValueError(f"channels={channels} out of range for D={num_channels} channels (x.shape[-1])")
    resolved = tuple(c % num_channels for c in channels)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"channels={channels} names a channel twice; list each index once")
    return resolved


def _add_noise(x: Tensor, channels: tuple[int, ...], noise: Tensor, scale: float) -> Tensor:
    """x + scale * noise on `channels` of the last axis; noise is (..., T, len(channels))."""
    out = x.clone()
    out[..., list(channels)] += scale * noise.to(device=x.device, dtype=x.dtype)
    return out


def _check_scale(scale: float, channels: tuple[int, ...] | None) -> None:
    if not (np.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale={scale!r} must be finite and >= 0 (units of the perturbed tensor)")
    if channels is not None and len(channels) == 0:
        raise ValueError("channels=() selects nothing; pass None for all channels or list indices")


@register_perturber("none")
@dataclass(frozen=True)
class NoPerturbation:
    """Identity: returns `x` itself (not a copy), for ablations without perturbation."""

    def __call__(self, x: Float[Tensor, "*batch T D"], generator: torch.Generator) -> Tensor:
        _check_condition(x, None)
        return x


@register_perturber("gaussian")
@dataclass(frozen=True)
class GaussianPerturber:
    """White noise x + scale * N(0, 1), independent per element: the non-smooth contrast."""

    scale: float = 0.01
    """Standard deviation, in the units of x (metres for head translations)."""
    channels: tuple[int, ...] | None = None
    """Indices along D to perturb; None perturbs all channels."""

    def __post_init__(self) -> None:
        _check_scale(self.scale, self.channels)

    def __call__(self, x: Float[Tensor, "*batch T D"], generator: torch.Generator) -> Tensor:
        channels = _check_condition(x, self.channels)
        shape = (*x.shape[:-1], len(channels))
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return _add_noise(x, channels, noise, self.scale)


@register_perturber("perlin")
@dataclass(frozen=True)
class PerlinPerturber:
    """Smooth noise x[..., t, d] + scale * pnoise1(offset[..., d] + t * frequency).

    One offset ~ U[0, offset_range) is drawn per (leading-batch element, channel), so every group
    member and every axis follows its own smooth curve. pnoise1's values lie roughly in [-1, 1].
    """

    scale: float = 0.01
    """Amplitude lambda, in the units of x (metres for head translations)."""
    frequency: float = 1.0 / 32.0
    """Perlin lattice cells per frame; features last about 1 / frequency frames (32 ~ 1 s at 30 fps)."""
    octaves: int = 1
    persistence: float = 0.5
    lacunarity: float = 2.0
    offset_range: float = 256.0
    """Offsets are drawn in [0, offset_range) lattice cells; 256 is the noise's full period."""
    channels: tuple[int, ...] | None = None
    """Indices along D to perturb; None perturbs all channels."""

    def __post_init__(self) -> None:
        _check_scale(self.scale, self.channels)
        if not (np.isfinite(self.frequency) and self.frequency > 0):
            raise ValueError(f"frequency={self.frequency!r} must be > 0 (lattice cells per frame)")
        if not (np.isfinite(self.offset_range) and self.offset_range > 0):
            raise ValueError(f"offset_range={self.offset_range!r} must be > 0 (lattice cells)")
        pnoise1(torch.zeros(1), self.octaves, self.persistence, self.lacunarity)  # validates octave params

    def __call__(self, x: Float[Tensor, "*batch T D"], generator: torch.Generator) -> Tensor:
        channels = _check_condition(x, self.channels)
        num_frames = x.shape[-2]
        shape = (*x.shape[:-2], 1, len(channels))
        uniform = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
        offsets = uniform.to(x.device) * self.offset_range
        frames = torch.arange(num_frames, dtype=torch.float32, device=x.device)[:, None]
        positions = offsets + frames * self.frequency  # (..., T, C) in lattice cells
        noise = pnoise1(positions, self.octaves, self.persistence, self.lacunarity)
        return _add_noise(x, channels, noise, self.scale)
