"""DDPO's JPEG rewards: sizes equal Pillow's file sizes worked out by hand, orderings, input errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffgrpo.rewards import RewardSet, available_rewards, get_reward
from tasks.text_to_image import rewards as t2i_rewards  # noqa: F401  (registers the JPEG rewards)


def pixels_to_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] whose round(255 x) gives the pixels back."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def jpeg_bytes_by_hand(pixels_hwc: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue())


def flat_and_noise(size_px: int = 48) -> np.ndarray:
    rng = np.random.default_rng(0)
    flat = np.full((size_px, size_px, 3), (200, 120, 40), dtype=np.uint8)
    noise = rng.integers(0, 256, (size_px, size_px, 3), dtype=np.uint8)
    return np.stack([flat, noise])  # (2, H, W, 3)


def test_flat_image_compresses_better_than_noise_and_sizes_match_pillow():
    pixels = flat_and_noise()
    images = pixels_to_images(pixels)
    compressibility = get_reward("jpeg_compressibility")({"images": images}, None)
    incompressibility = get_reward("jpeg_incompressibility")({"images": images}, None)
    expected_kb = [jpeg_bytes_by_hand(p, quality=95) / 1000 for p in pixels]
    assert compressibility.shape == (2,) and compressibility.dtype == torch.float32
    assert compressibility.tolist() == pytest.approx([-kb for kb in expected_kb], rel=0, abs=1e-6)
    assert torch.equal(incompressibility, -compressibility)
    assert compressibility[0] > compressibility[1]  # the flat image is the smaller file
    assert expected_kb[1] > 4 * expected_kb[0]  # by far (the flat file is mostly JPEG headers)


def test_quality_sets_the_size():
    pixels = flat_and_noise()[1:]
    images = pixels_to_images(pixels)
    low = get_reward("jpeg_incompressibility", quality=10)({"images": images}, None)
    high = get_reward("jpeg_incompressibility")({"images": images}, None)
    assert low.tolist() == pytest.approx([jpeg_bytes_by_hand(pixels[0], quality=10) / 1000], abs=1e-6)
    assert low[0] < high[0]


@pytest.mark.unchecked_annotations
@pytest.mark.parametrize("quality", [0, 101, 9.5, True])
def test_bad_quality_names_the_range(quality):
    with pytest.raises(ValueError, match=r"quality=.*must be an integer in \[1, 100\]"):
        get_reward("jpeg_compressibility", quality=quality)


def test_registered_and_combined_in_a_reward_set():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())
    images = pixels_to_images(flat_and_noise())
    out = RewardSet.from_specs({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5})({"images": images}, {})
    torch.testing.assert_close(out.total, -0.5 * out.components["jpeg_incompressibility"])


@pytest.mark.unchecked_annotations
@pytest.mark.parametrize(("decoded", "match"), [
    ({"x0": torch.zeros(2, 3, 8, 8)}, r"decoded\['images'\].*decode\(\) must return"),
    ({"images": torch.zeros(2, 8, 8, 3)}, r"\(2, 8, 8, 3\).*permute"),
    ({"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8)}, r"torch.uint8.*divide by 255"),
    ({"images": torch.full((2, 3, 8, 8), -0.5)}, r"spans \[-0.5, -0.5\].*\(x / 2 \+ 0.5\).clamp\(0, 1\)"),
    ({"images": torch.full((2, 3, 8, 8), float("nan"))}, r"NaN or inf.*float32"),
])
def test_bad_images_name_the_fix(decoded, match):
    with pytest.raises(ValueError, match=match):
        get_reward("jpeg_compressibility")(decoded, None)
