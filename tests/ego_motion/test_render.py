"""Rendering writes valid PNG/GIF files of the expected size and frame count, the pictures are not
blank, and different motions give different pictures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.ego_motion.body.geometry import HEAD_JOINT
from tasks.ego_motion.evaluation.render import render_animation_gif, render_frames_png

# A rough standing pose (metres, +X forward, +Y left, +Z up), SMPL-H order of the 22 joints.
_REST_POSE_M = np.array(
    [
        [0.00, 0.00, 0.95], [0.00, 0.09, 0.87], [0.00, -0.09, 0.87], [0.00, 0.00, 1.05],
        [0.00, 0.09, 0.50], [0.00, -0.09, 0.50], [0.00, 0.00, 1.18], [0.00, 0.09, 0.08],
        [0.00, -0.09, 0.08], [0.00, 0.00, 1.25], [0.12, 0.09, 0.02], [0.12, -0.09, 0.02],
        [0.00, 0.00, 1.45], [0.00, 0.07, 1.40], [0.00, -0.07, 1.40], [0.02, 0.00, 1.58],
        [0.00, 0.18, 1.40], [0.00, -0.18, 1.40], [0.00, 0.20, 1.12], [0.00, -0.20, 1.12],
        [0.00, 0.20, 0.87], [0.00, -0.20, 0.87],
    ]
)  # fmt: skip
_LEFT_LEG, _RIGHT_LEG = (4, 7, 10), (5, 8, 11)
_LEFT_ARM, _RIGHT_ARM = (18, 20), (19, 21)


def _swing(points: np.ndarray, pivot: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotate points about the horizontal +Y axis through pivot (a leg or arm swinging forward)."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    R = np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])  # positive angle swings down-points forward
    return (points - pivot) @ R.T + pivot


def synthetic_walk(num_frames: int, fps: float = 30.0, speed_m_s: float = 1.2, heading_rad: float = 0.0):
    """(T, 22, 3) stick figure walking along ``heading_rad`` with swinging legs and arms."""
    frames = []
    for t in range(num_frames):
        phase = 2.0 * math.pi * 0.9 * t / fps  # 0.9 strides per second
        pose = _REST_POSE_M.copy()
        for leg, hip, sign in ((_LEFT_LEG, 1, 1.0), (_RIGHT_LEG, 2, -1.0)):
            pose[list(leg)] = _swing(pose[list(leg)], pose[hip], sign * 0.35 * math.sin(phase))
        for arm, shoulder, sign in ((_LEFT_ARM, 16, -1.0), (_RIGHT_ARM, 17, 1.0)):
            pose[list(arm)] = _swing(pose[list(arm)], pose[shoulder], sign * 0.3 * math.sin(phase))
        pose[:, 2] += 0.02 * abs(math.sin(phase))  # slight bob
        c, s = math.cos(heading_rad), math.sin(heading_rad)
        pose = pose @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T
        pose[:, :2] += speed_m_s * t / fps * np.array([c, s])
        frames.append(pose)
    return np.stack(frames)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_png_grid_is_written_and_not_blank(tmp_path: Path) -> None:
    gt = synthetic_walk(12)
    pred = torch.from_numpy(gt + np.array([0.0, 0.05, 0.0]))  # tensors are accepted too
    path = render_frames_png(
        tmp_path / "sub" / "grid.png", gt, pred, head_positions=gt[:, HEAD_JOINT], frames=[0, 5, 11],
        title="walk", num_columns=3, panel_size_in=2.0, dpi=50,
    )  # fmt: skip
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (300, 130)  # 3 panels of 2 in at 50 dpi, 2.6 in tall
    pixels = _pixels(path)
    assert pixels.std() > 10.0  # not a blank canvas
    # Both skeleton colours are present: blue ground truth and orange prediction.
    blue = (pixels[..., 2] > 120) & (pixels[..., 0] < 80)
    orange = (pixels[..., 0] > 180) & (pixels[..., 2] < 80)
    assert blue.sum() > 20 and orange.sum() > 20


def test_different_motion_gives_different_png(tmp_path: Path) -> None:
    kwargs = dict(frames=[0, 6], num_columns=2, panel_size_in=2.0, dpi=40)
    a = render_frames_png(tmp_path / "a.png", synthetic_walk(8), **kwargs)
    b = render_frames_png(tmp_path / "b.png", synthetic_walk(8, heading_rad=1.2), **kwargs)
    pixels_a, pixels_b = _pixels(a), _pixels(b)
    assert pixels_a.shape == pixels_b.shape
    assert np.abs(pixels_a - pixels_b).mean() > 0.5


def test_gif_has_one_image_per_drawn_frame(tmp_path: Path) -> None:
    gt = synthetic_walk(7)
    path = render_animation_gif(
        tmp_path / "walk.gif", gt, gt + np.array([0.1, 0.0, 0.0]), head_positions=gt[:, HEAD_JOINT],
        title="walk", frame_step=2, size_in=2.0, dpi=40,
    )  # fmt: skip
    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.n_frames == 4  # frames 0, 2, 4, 6
        first = np.asarray(image.convert("RGB"), dtype=np.int16)
        image.seek(3)
        last = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert first.std() > 10.0
    assert np.abs(first - last).mean() > 0.1  # the figure moved


def test_rejects_bad_inputs(tmp_path: Path) -> None:
    gt = synthetic_walk(4)
    with pytest.raises(ValueError, match=r"\(T, 22, 3\)"):
        render_frames_png(tmp_path / "x.png", gt[None])
    with pytest.raises(ValueError, match="same number of frames"):
        render_frames_png(tmp_path / "x.png", gt, gt[:3])
    with pytest.raises(ValueError, match=r"\(T, 3\)"):
        render_frames_png(tmp_path / "x.png", gt, head_positions=gt[:3, HEAD_JOINT])
    with pytest.raises(ValueError, match="frames"):
        render_frames_png(tmp_path / "x.png", gt, frames=[4])
    bad = gt.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render_animation_gif(tmp_path / "x.gif", bad)
