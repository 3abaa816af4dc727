"""Skeleton pictures of ground-truth vs predicted motion: a still grid (PNG) and an animation (GIF).

Why: metrics say how far off a prediction is; a picture says how (a sliding foot, a leaning
torso, a body floating above the floor). Rendering uses matplotlib's Agg backend only, so it
works headless on the training machines, and Pillow (a matplotlib dependency) writes the GIF.

Inputs are world-frame joint positions (T, 22, 3) in metres, +Z up, floor at z = 0, SMPL-H
order; bones follow ``geometry.SMPLH_PARENTS[:22]``. Every panel uses the same cube of world
space (equal scale on x, y and z), fitted to all frames, so motion between panels is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402
from torch import Tensor  # noqa: E402

from tasks.ego_motion.geometry import SMPLH_PARENTS  # noqa: E402

NUM_RENDER_JOINTS = 22
BODY_PARENTS: tuple[int, ...] = SMPLH_PARENTS[:NUM_RENDER_JOINTS]
GT_COLOR = "#1f5fa8"  # blue
PRED_COLOR = "#e07b00"  # orange
HEAD_COLOR = "#2a9d3a"  # green


def _as_numpy_joints(name: str, joints: Tensor | np.ndarray) -> np.ndarray:
    array = joints.detach().cpu().numpy() if isinstance(joints, Tensor) else np.asarray(joints)
    if array.ndim != 3 or array.shape[1:] != (NUM_RENDER_JOINTS, 3):
        raise ValueError(
            f"{name} must have shape (T, {NUM_RENDER_JOINTS}, 3) (world metres, SMPL-H order), got "
            f"{array.shape}; render one sequence at a time (joints[b]) and drop hand joints."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values; fix or crop those frames first.")
    return array.astype(np.float64)


def _prepare(
    gt_joints: Tensor | np.ndarray,
    pred_joints: Tensor | np.ndarray | None,
    head_positions: Tensor | np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    gt = _as_numpy_joints("gt_joints", gt_joints)
    pred = None if pred_joints is None else _as_numpy_joints("pred_joints", pred_joints)
    if pred is not None and pred.shape != gt.shape:
        raise ValueError(
            f"pred_joints {pred.shape} and gt_joints {gt.shape} must have the same number of frames."
        )
    head = None
    if head_positions is not None:
        head_t = head_positions.detach().cpu().numpy() if isinstance(head_positions, Tensor) else None
        head = np.asarray(head_t if head_t is not None else head_positions, dtype=np.float64)
        if head.shape != (gt.shape[0], 3):
            raise ValueError(
                f"head_positions must have shape (T, 3) = ({gt.shape[0]}, 3) (world metres, e.g. "
                f"T_world_cpf[:, :3, 3]), got {head.shape}."
            )
        if not np.isfinite(head).all():
            raise ValueError("head_positions contains NaN or infinite values.")
    return gt, pred, head


def _scene_cube(*arrays: np.ndarray | None) -> tuple[np.ndarray, float]:
    """Centre and half-width of one cube containing all points and the floor z = 0."""
    points = np.concatenate([a.reshape(-1, 3) for a in arrays if a is not None], axis=0)
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    lo[2] = min(lo[2], 0.0)
    centre = (lo + hi) / 2.0
    half = max(float((hi - lo).max()) / 2.0, 0.5) * 1.05
    return centre, half


def _draw_floor(ax, centre: np.ndarray, half: float, spacing_m: float = 0.5) -> None:
    lo_x, hi_x = centre[0] - half, centre[0] + half
    lo_y, hi_y = centre[1] - half, centre[1] + half
    for x in np.arange(math.floor(lo_x / spacing_m), math.ceil(hi_x / spacing_m) + 1) * spacing_m:
        ax.plot([x, x], [lo_y, hi_y], [0.0, 0.0], color="0.8", linewidth=0.6, zorder=0)
    for y in np.arange(math.floor(lo_y / spacing_m), math.ceil(hi_y / spacing_m) + 1) * spacing_m:
        ax.plot([lo_x, hi_x], [y, y], [0.0, 0.0], color="0.8", linewidth=0.6, zorder=0)


def _draw_skeleton(ax, joints_t: np.ndarray, color: str, label: str | None) -> None:
    for child, parent in enumerate(BODY_PARENTS):
        if parent < 0:
            continue
        segment = joints_t[[parent, child]]  # (2, 3)
        ax.plot(segment[:, 0], segment[:, 1], segment[:, 2], color=color, linewidth=2.0,
                label=label if child == 1 else None)  # fmt: skip
    ax.scatter(joints_t[:, 0], joints_t[:, 1], joints_t[:, 2], color=color, s=6, depthshade=False)


def _draw_frame(
    ax,
    t: int,
    gt: np.ndarray,
    pred: np.ndarray | None,
    head: np.ndarray | None,
    centre: np.ndarray,
    half: float,
    show_legend: bool,
) -> None:
    ax.cla()
    _draw_floor(ax, centre, half)
    if head is not None:
        ax.plot(head[:, 0], head[:, 1], head[:, 2], color=HEAD_COLOR, linewidth=1.0, alpha=0.7,
                label="head trajectory")  # fmt: skip
        ax.scatter(*head[t], color=HEAD_COLOR, s=18, depthshade=False)
    _draw_skeleton(ax, gt[t], GT_COLOR, "ground truth")
    if pred is not None:
        _draw_skeleton(ax, pred[t], PRED_COLOR, "prediction")
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_box_aspect((1.0, 1.0, 1.0))  # equal metres per unit on all axes
    ax.view_init(elev=15.0, azim=-60.0)
    ax.set_title(f"frame {t}", fontsize=8)
    ax.tick_params(labelsize=5, pad=0)
    ax.set_xlabel("x (m)", fontsize=6, labelpad=-8)
    ax.set_ylabel("y (m)", fontsize=6, labelpad=-8)
    ax.set_zlabel("z (m)", fontsize=6, labelpad=-8)
    if show_legend:
        ax.legend(loc="upper left", fontsize=6, frameon=False)


def render_frames_png(
    path: str | Path,
    gt_joints: Tensor | np.ndarray,
    pred_joints: Tensor | np.ndarray | None = None,
    head_positions: Tensor | np.ndarray | None = None,
    frames: Sequence[int] | None = None,
    title: str = "",
    num_columns: int = 4,
    panel_size_in: float = 2.6,
    dpi: int = 100,
) -> Path:
    """Write a grid of 3-D skeleton panels, one per selected frame, as a PNG; returns the path.

    Args:
        path: output file (parent folders are created).
        gt_joints: (T, 22, 3) ground-truth joints, world metres; drawn in blue.
        pred_joints: optional (T, 22, 3) prediction; drawn in orange.
        head_positions: optional (T, 3) head/CPF positions, world metres; the whole trajectory is
            drawn as a green line in every panel, with a dot at the panel's frame.
        frames: frame indices to draw; default 8 evenly spaced frames (fewer if T < 8).
        title: figure title.
        num_columns: panels per row.
        panel_size_in, dpi: size of one panel in inches and the resolution.
    """
    gt, pred, head = _prepare(gt_joints, pred_joints, head_positions)
    num_frames = gt.shape[0]
    if frames is None:
        frames = np.unique(np.linspace(0, num_frames - 1, num=min(8, num_frames)).round().astype(int))
    frames = [int(f) for f in frames]
    if not frames or any(f < 0 or f >= num_frames for f in frames):
        raise ValueError(f"frames must be a non-empty list of indices in [0, {num_frames}), got {frames}.")
    if num_columns < 1:
        raise ValueError(f"num_columns must be >= 1, got {num_columns}.")
    centre, half = _scene_cube(gt, pred, head)
    num_cols = min(num_columns, len(frames))
    num_rows = math.ceil(len(frames) / num_cols)
    fig = plt.figure(figsize=(panel_size_in * num_cols, panel_size_in * num_rows + 0.4), dpi=dpi)
    try:
        for i, t in enumerate(frames):
            ax = fig.add_subplot(num_rows, num_cols, i + 1, projection="3d")
            _draw_frame(ax, t, gt, pred, head, centre, half, show_legend=(i == 0))
        if title:
            fig.suptitle(title, fontsize=10)
        fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.92, wspace=0.0, hspace=0.1)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def render_animation_gif(
    path: str | Path,
    gt_joints: Tensor | np.ndarray,
    pred_joints: Tensor | np.ndarray | None = None,
    head_positions: Tensor | np.ndarray | None = None,
    title: str = "",
    fps: float = 30.0,
    frame_step: int = 1,
    size_in: float = 4.0,
    dpi: int = 80,
) -> Path:
    """Write an animated GIF with one image per ``frame_step``-th frame; returns the path.

    Args:
        path: output file (parent folders are created).
        gt_joints, pred_joints, head_positions: as in ``render_frames_png``.
        title: figure title.
        fps: frame rate of the input motion; the GIF plays in real time (fps / frame_step images
            per second).
        frame_step: draw every n-th frame (the GIF has ceil(T / frame_step) images).
        size_in, dpi: figure size in inches and the resolution.
    """
    gt, pred, head = _prepare(gt_joints, pred_joints, head_positions)
    if not (math.isfinite(fps) and fps > 0) or frame_step < 1:
        raise ValueError(f"need fps > 0 and frame_step >= 1, got fps={fps}, frame_step={frame_step}.")
    frames = list(range(0, gt.shape[0], frame_step))
    centre, half = _scene_cube(gt, pred, head)
    fig = plt.figure(figsize=(size_in, size_in), dpi=dpi)
    try:
        ax = fig.add_subplot(1, 1, 1, projection="3d")
        if title:
            fig.suptitle(title, fontsize=10)

        def update(t: int) -> list:
            _draw_frame(ax, t, gt, pred, head, centre, half, show_legend=True)
            return []

        animation = FuncAnimation(fig, update, frames=frames, blit=False, repeat=False)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        animation.save(str(path), writer=PillowWriter(fps=fps / frame_step), dpi=dpi)
    finally:
        plt.close(fig)
    return path


def joints_to_numpy(joints: Tensor) -> np.ndarray:
    """(..., 22, 3) tensor -> float64 numpy array on the CPU (convenience for notebooks)."""
    return joints.detach().to(torch.float64).cpu().numpy()
