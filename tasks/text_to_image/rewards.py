"""DDPO's model-free image rewards: the size of each image as a JPEG file.

Why: JPEG compressibility is the simplest reward of DDPO (Black et al. 2023, "Training Diffusion
Models with Reinforcement Learning"): no reward model, deterministic, cheap, and
easy to read off the images (a compressible image is smooth and plain, an incompressible one is
detailed and noisy). It checks a text-to-image GRPO run end to end before a learned reward is used.

Registered rewards (``diffgrpo.rewards`` signature ``reward(decoded, batch)``; ``decoded["images"]``
is float (N, 3, H, W), RGB in [0, 1], what the text-to-image task's ``decode`` returns):
- ``jpeg_compressibility``: R = -size / 1000, the JPEG file's size in kB (1 kB = 1000 bytes),
  negated: smaller files score higher.
- ``jpeg_incompressibility``: R = +size / 1000 kB: larger files score higher.

Both encode with Pillow at ``quality`` (1-100, default 95 as in DDPO; Pillow's defaults otherwise)
after quantising each pixel to round(255 x) in uint8; the batch is ignored.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from diffgrpo.rewards import Reward, register_reward


def jpeg_size_kb(images: Float[Tensor, "N 3 H W"], quality: int = 95) -> Float[Tensor, " N"]:
    """Size in kB (1000 bytes) of each RGB image in [0, 1] saved by Pillow as a JPEG at ``quality``, float32."""
    pixels = (images.detach().to("cpu", torch.float32) * 255.0).round().to(torch.uint8)  # (N, 3, H, W)
    pixels_hwc = pixels.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) for Pillow
    sizes = []
    for image in pixels_hwc:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def decoded_images(decoded: Mapping[str, Any]) -> Tensor:
    """``decoded["images"]`` checked to be a finite float tensor (N, 3, H, W) in [0, 1]."""
    if not isinstance(decoded, Mapping) or "images" not in decoded:
        got = sorted(decoded) if isinstance(decoded, Mapping) else type(decoded).__name__
        raise ValueError(f"JPEG rewards read decoded['images'], got {got}; the task's decode() must return "
                         "{'images': float (N, 3, H, W) in [0, 1], ...}")
    images = decoded["images"]
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
        got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"decoded['images'] is {got}; JPEG rewards need float RGB images (N, 3, H, W) in [0, 1] "
                         "(channels first: permute (N, H, W, 3) with .permute(0, 3, 1, 2); uint8: divide by 255)")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("decoded['images'] holds NaN or inf; check the VAE decode (e.g. run it in float32)")
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"decoded['images'] spans [{low:.3g}, {high:.3g}], expected [0, 1]; map a VAE's [-1, 1] "
                         "output with (x / 2 + 0.5).clamp(0, 1) in the task's decode()")
    return images


def _check_quality(quality: int) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r} must be an integer in [1, 100] (Pillow's JPEG quality; DDPO uses 95)")


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> Reward:
    """R = -(JPEG size in kB): DDPO's compressibility reward, (N,)."""
    _check_quality(quality)

    def reward(decoded: Mapping[str, Any], batch: Any) -> Tensor:
        return -jpeg_size_kb(decoded_images(decoded), quality)

    return reward


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> Reward:
    """R = +(JPEG size in kB): DDPO's incompressibility reward, (N,)."""
    _check_quality(quality)

    def reward(decoded: Mapping[str, Any], batch: Any) -> Tensor:
        return jpeg_size_kb(decoded_images(decoded), quality)

    return reward
