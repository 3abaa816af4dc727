"""Skeleton pictures of ground-truth vs predicted motion: a still grid (PNG) and an animation (GIF).

Why: metrics say how far off a prediction is; a picture says how (a sliding foot, a leaning
torso, a body floating above the floor). Figures are built as bare ``matplotlib.figure.Figure``
objects rendered by the Agg canvas, never through pyplot, so rendering works headless and leaves
the caller's pyplot backend and open figures alone; Pillow (a matplotlib dependency) writes GIFs.

Inputs are world-frame joint positions (T, 22, 3) in metres, +Z up, floor at z = 0, SMPL-H
order; bones follow ``geometry.SMPLH_PARENTS[:22]``. Every panel shows a cube of world space of
one common size (equal metres per unit on x, y and z in every panel), its bottom at the floor;
a grid fixed to the world at z = 0 and the head trajectory show where the body moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator
from torch import Tensor

from tasks.ego_motion.body.geometry import SMPLH_PARENTS

NUM_RENDER_JOINTS = 22
BODY_PARENTS: tuple[int, ...] = SMPLH_PARENTS[:NUM_RENDER_JOINTS]
GT_COLOR = "#1f5fa8"  # blue
PRED_COLOR = "#e07b00"  # orange
HEAD_COLOR = "#2a9d3a"  # green


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)).astype(np.float64)


def _as_numpy_joints(name: str, joints: Tensor | np.ndarray) -> np.ndarray:
    array = _to_numpy(joints)
    if array.ndim != 3 or array.shape[1:] != (NUM_RENDER_JOINTS, 3):
        raise ValueError(
            f"{name} must have shape (T, {NUM_RENDER_JOINTS}, 3) (world metres, SMPL-H order), got "
            f"{array.shape}; render one sequence at a time (joints[b]) and drop hand joints."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values; fix or crop those frames first.")
    return array


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
        head = _to_numpy(head_positions)
        if head.shape != (gt.shape[0], 3):
            raise ValueError(
                f"head_positions must have shape (T, 3) = ({gt.shape[0]}, 3) (world metres, e.g. "
                f"T_world_cpf[:, :3, 3]), got {head.shape}."
            )
        if not np.isfinite(head).all():
            raise ValueError("head_positions contains NaN or infinite values.")
    return gt, pred, head


def _view_boxes(
    gt: np.ndarray, pred: np.ndarray | None, head: np.ndarray | None, use_follow_camera: bool
) -> tuple[np.ndarray, float]:
    """Per-frame lower corners (T, 3) and the common edge length (m) of the cubes to draw.

    All cubes have the same size, so every panel has the same metres per pixel on every axis;
    their bottom is just below the floor (or the lowest joint). With ``use_follow_camera`` the
    cube follows the body horizontally (the floor grid and head line still show the motion);
    otherwise one cube holds the whole clip.
    """
    bodies = gt if pred is None else np.concatenate([gt, pred], axis=1)  # (T, J, 3)
    z_low = min(0.0, float(bodies[..., 2].min())) - 0.05
    lo_xy = bodies[..., :2].min(axis=1)  # (T, 2)
    hi_xy = bodies[..., :2].max(axis=1)
    z_high = float(bodies[..., 2].max())
    if use_follow_camera:
        extent = max(float((hi_xy - lo_xy).max()), z_high - z_low)
        size = max(extent * 1.15 + 0.2, 1.0)
        centre_xy = (lo_xy + hi_xy) / 2.0  # (T, 2)
    else:
        everything = bodies.reshape(-1, 3) if head is None else np.concatenate([bodies.reshape(-1, 3), head])
        lo, hi = everything.min(axis=0), everything.max(axis=0)
        size = max(float((hi[:2] - lo[:2]).max()), float(hi[2]) - z_low, 1.0) * 1.05
        centre_xy = np.broadcast_to((lo[:2] + hi[:2]) / 2.0, (gt.shape[0], 2))
    lower = np.concatenate([centre_xy - size / 2.0, np.full((gt.shape[0], 1), z_low)], axis=1)
    return lower, size


def _clip_to_box(points: np.ndarray, lower: np.ndarray, size: float) -> np.ndarray:
    """(N, 3) points with those outside the cube replaced by NaN (mplot3d does not clip lines)."""
    inside = ((points >= lower) & (points <= lower + size)).all(axis=-1)
    return np.where(inside[:, None], points, np.nan)


def _draw_floor(ax, lower: np.ndarray, size: float, spacing_m: float = 0.5) -> None:
    """Grid lines on the floor z = 0 at world multiples of ``spacing_m`` (fixed in the world)."""
    (lo_x, lo_y), (hi_x, hi_y) = lower[:2], lower[:2] + size
    style = dict(color="0.55", linewidth=0.6, zorder=0)
    for x in np.arange(math.ceil(lo_x / spacing_m), math.floor(hi_x / spacing_m) + 1) * spacing_m:
        ax.plot([x, x], [lo_y, hi_y], [0.0, 0.0], **style)
    for y in np.arange(math.ceil(lo_y / spacing_m), math.floor(hi_y / spacing_m) + 1) * spacing_m:
        ax.plot([lo_x, hi_x], [y, y], [0.0, 0.0], **style)


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
    lower: np.ndarray,
    size: float,
    show_legend: bool,
    gt_label: str = "ground truth",
    pred_label: str = "prediction",
) -> None:
    ax.cla()
    ax.grid(False)
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_pane_color((1.0, 1.0, 1.0, 0.0))
    _draw_floor(ax, lower, size)
    if head is not None:
        visible = _clip_to_box(head, lower, size)
        ax.plot(visible[:, 0], visible[:, 1], visible[:, 2], color=HEAD_COLOR, linewidth=1.2,
                label="head trajectory")  # fmt: skip
    _draw_skeleton(ax, gt[t], GT_COLOR, gt_label)
    if pred is not None:
        _draw_skeleton(ax, pred[t], PRED_COLOR, pred_label)
    if head is not None:
        ax.scatter(*head[t], color=HEAD_COLOR, s=18, depthshade=False)
    ax.set_xlim(lower[0], lower[0] + size)
    ax.set_ylim(lower[1], lower[1] + size)
    ax.set_zlim(lower[2], lower[2] + size)
    ax.set_box_aspect((1.0, 1.0, 1.0))  # equal metres per unit on all axes
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MultipleLocator(0.5))  # ticks every 0.5 m, like the floor grid
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
    use_follow_camera: bool = True,
    panel_size_in: float = 2.6,
    dpi: int = 100,
    gt_label: str = "ground truth",
    pred_label: str = "prediction",
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
        use_follow_camera: each panel's cube follows the body horizontally (default; bodies stay
            large), or one cube holds the whole clip (False; shows where the body went).
        panel_size_in, dpi: size of one panel in inches and the resolution.
        gt_label: legend entry of ``gt_joints`` (e.g. "prediction" when drawing a prediction alone).
        pred_label: legend entry of ``pred_joints`` (e.g. "post-trained" beside the prior).
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
    lower, size = _view_boxes(gt, pred, head, use_follow_camera)
    num_cols = min(num_columns, len(frames))
    num_rows = math.ceil(len(frames) / num_cols)
    fig_height_in = panel_size_in * num_rows + 0.6  # + a strip for the title
    fig = Figure(figsize=(panel_size_in * num_cols, fig_height_in), dpi=dpi)
    for i, t in enumerate(frames):
        ax = fig.add_subplot(num_rows, num_cols, i + 1, projection="3d")
        _draw_frame(ax, t, gt, pred, head, lower[t], size, show_legend=(i == 0), gt_label=gt_label,
                    pred_label=pred_label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(
        left=0.0, right=1.0, bottom=0.0, top=1.0 - 0.6 / fig_height_in, wspace=0.0, hspace=0.1
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def render_animation_gif(
    path: str | Path,
    gt_joints: Tensor | np.ndarray,
    pred_joints: Tensor | np.ndarray | None = None,
    head_positions: Tensor | np.ndarray | None = None,
    title: str = "",
    fps: float = 30.0,
    frame_step: int = 1,
    use_follow_camera: bool = True,
    size_in: float = 4.0,
    dpi: int = 80,
    gt_label: str = "ground truth",
) -> Path:
    """Write an animated GIF with one image per ``frame_step``-th frame; returns the path.

    Args:
        path: output file (parent folders are created).
        gt_joints, pred_joints, head_positions: as in ``render_frames_png``.
        title: figure title.
        fps: frame rate of the input motion; the GIF plays in real time (fps / frame_step images
            per second).
        frame_step: draw every n-th frame (the GIF has ceil(T / frame_step) images).
        use_follow_camera: as in ``render_frames_png``.
        size_in, dpi: figure size in inches and the resolution.
        gt_label: as in ``render_frames_png``.
    """
    gt, pred, head = _prepare(gt_joints, pred_joints, head_positions)
    if not (math.isfinite(fps) and fps > 0) or frame_step < 1:
        raise ValueError(f"need fps > 0 and frame_step >= 1, got fps={fps}, frame_step={frame_step}.")
    frames = list(range(0, gt.shape[0], frame_step))
    lower, size = _view_boxes(gt, pred, head, use_follow_camera)
    fig = Figure(figsize=(size_in, size_in), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    if title:
        fig.suptitle(title, fontsize=10)

    def update(t: int) -> list:
        _draw_frame(ax, t, gt, pred, head, lower[t], size, show_legend=True, gt_label=gt_label)
        return []

    animation = FuncAnimation(fig, update, frames=frames, blit=False, repeat=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    animation.save(str(path), writer=PillowWriter(fps=fps / frame_step), dpi=dpi)
    return path
