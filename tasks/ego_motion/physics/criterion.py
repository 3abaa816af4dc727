"""What executing a motion means beyond surviving it: measures of RLPF's success criterion that the pelvis and head
tolerance misses, from the reference motion and the tracker's simulated joints.

The tracker (``tracking.py``) keeps the pelvis and head within a tolerance of the reference's; a humanoid that balances
can do so for motions no body could perform, by moving differently from them. Two of the non-physical edits of
``edits.py`` showed it on the floor-contact post-train windows (``recipes/benchmarks/bench_physics.py``):

- **slid** (the whole motion drifting at 1 m/s): the humanoid shuffles its feet and follows. Its feet are not where
  the reference's are, but the ground truth's simulated feet also stray from the reference's (they slip at their
  contacts), so measures on the simulated feet overlapped: the horizontal error of the feet while the reference's
  are planted (mean over frames) reached 0.12 m on the ground truth and started at 0.15 m on the slid motions the
  tracker executed. What separates is the friction law in the reference itself: a foot that stands on the floor
  does not slide, and the reference's planted feet move at :func:`planted_foot_speed` (at most 0.23 m/s on the
  ground truth, at least 0.95 m/s slid).
- **frames shuffled** (random frame order) of a window that moves little: the humanoid follows the frames' average
  pose within the tolerance but cannot jump between frames, so it covers far less distance than the reference:
  :func:`unexecuted_speed` (at most 0.03 m/s on the ground truth, at least 0.45 m/s on the shuffled motions it
  executed).

The numbers, how the thresholds (``TrackingConfig``) were chosen and what the criterion still lets through (captures
sunk a few centimetres, which real captures also are): docs/ego_motion_rlpf.md, "The success criterion".

Units: metres, seconds, world frame (+Z up, floor at z = 0).
"""

from __future__ import annotations

import math

import mujoco
import numpy as np

from .humanoid import Humanoid


def reference_kinematics(humanoid: Humanoid, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World positions of the reference's 22 joints (T, 22, 3) and of its 16 foot points (T, 16, 3)
    (:meth:`Humanoid.foot_points`: the sole boxes' bottom corners) for ``qpos`` (T, nq), by forward kinematics.

    Raises:
        ValueError: ``qpos`` is not a (T, nq) array.
    """
    model = humanoid.model
    if qpos.ndim != 2 or qpos.shape[1] != model.nq:
        raise ValueError(f"qpos must be a (T, {model.nq}) array from Humanoid.qpos, got shape {qpos.shape}.")
    data = mujoco.MjData(model)
    joints = np.empty((qpos.shape[0], len(humanoid.body_ids), 3))
    feet = np.empty((qpos.shape[0], len(humanoid.foot_site_ids), 3))
    q, xpos, site_xpos = data.qpos, data.xpos, data.site_xpos  # views of data's buffers
    for t in range(qpos.shape[0]):
        q[:] = qpos[t]
        mujoco.mj_kinematics(model, data)
        joints[t] = xpos[humanoid.body_ids]
        feet[t] = site_xpos[humanoid.foot_site_ids]  # the sole corners, Humanoid.foot_points' (sites of the model)
    return joints, feet


def contact_height_m(foot_points: np.ndarray) -> float:
    """The height (m) at which a motion's feet meet its floor: the median over frames of its lowest foot point, from
    ``foot_points`` (T, 16, 3). A capture on the floor gives about 0; one whose feet float gives their height (the
    floor-contact windows have a foot near the floor in at least 90 % of their frames, so the median is a contact).

    Raises:
        ValueError: ``foot_points`` is not a finite (T, P, 3) array with T >= 1.
    """
    if foot_points.ndim != 3 or foot_points.shape[-1] != 3 or len(foot_points) < 1 or not np.isfinite(
            foot_points).all():
        raise ValueError(f"foot_points must be a finite (T, P, 3) array, got shape {foot_points.shape}.")
    return float(np.median(foot_points[..., 2].min(axis=1)))


def planted_foot_speed(foot_points: np.ndarray, fps: float, band_m: float) -> float:
    """How fast the motion's planted feet slide (m/s): over the foot points and adjacent frame pairs in which the point
    is at most ``band_m`` above the motion's :func:`contact_height_m` (or below it) in both frames, the median
    horizontal speed; 0 when no point is planted in two consecutive frames.

    Relative to the motion's own contact height, so a capture that floats or sinks a few centimetres is judged on
    its sliding alone (the floor's height is the pelvis-rise and residual criteria's business). The median, not the
    mean: a heel pivot or a foot put down moves some planted points for a frame or two.

    Args:
        foot_points: (T, P, 3) world positions of the reference's foot points (:func:`reference_kinematics`), T >= 2.
        fps: frame rate (frames per second), > 0.
        band_m: how far above the contact height a point still counts as planted (m), >= 0.

    Raises:
        ValueError: bad shapes, fewer than 2 frames, non-finite values, or fps / band out of range.
    """
    if foot_points.ndim != 3 or foot_points.shape[-1] != 3 or len(foot_points) < 2:
        raise ValueError(f"foot_points must be a (T, P, 3) array with T >= 2, got shape {foot_points.shape}.")
    if not (math.isfinite(fps) and fps > 0 and math.isfinite(band_m) and band_m >= 0):
        raise ValueError(f"fps must be finite and > 0 and band_m finite and >= 0, got fps={fps!r}, band_m={band_m!r}.")
    planted = foot_points[..., 2] <= contact_height_m(foot_points) + band_m  # (T, P)
    both = planted[1:] & planted[:-1]  # (T - 1, P)
    speed = np.linalg.norm(np.diff(foot_points[..., :2], axis=0), axis=-1) * fps  # (T - 1, P)
    return float(np.median(speed[both])) if both.any() else 0.0


def unexecuted_speed(reference_joints: np.ndarray, simulated_joints: np.ndarray, fps: float) -> float:
    """The reference's motion the simulation did not reproduce (m/s): the mean over joints of the reference's path
    length minus the simulated path length (sums of frame-to-frame distances), over the window's duration.

    About 0 when the humanoid moves as the reference does (negative when it moves more, e.g. correcting its
    balance); large when the reference jumps back and forth between poses the humanoid can only average.

    Args:
        reference_joints: (T, J, 3) world joint positions of the reference, T >= 2.
        simulated_joints: (T, J, 3) the humanoid's, same frames (only the executed frames, when comparing a run
            that fell).
        fps: frame rate (frames per second), > 0.

    Raises:
        ValueError: mismatched or bad shapes, fewer than 2 frames, or fps out of range.
    """
    if reference_joints.shape != simulated_joints.shape or reference_joints.ndim != 3 or len(reference_joints) < 2:
        raise ValueError(f"reference_joints and simulated_joints must be (T, J, 3) arrays of one shape, T >= 2, got "
                         f"{reference_joints.shape} and {simulated_joints.shape}.")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be finite and > 0, got {fps!r}.")

    def path(joints: np.ndarray) -> np.ndarray:  # (J,) metres
        return np.linalg.norm(np.diff(joints, axis=0), axis=-1).sum(axis=0)

    duration_s = (len(reference_joints) - 1) / fps
    return float((path(reference_joints) - path(simulated_joints)).mean() / duration_s)


def graded_success(survival: float, measures: list[tuple[float, float]]) -> float:
    """A graded form of RLPF's binary success, in [0, 1]: ``survival`` x the product over the criteria of
    min(1, bound / measure), for (measure, bound) pairs of non-negative bounds (``TrackingConfig``'s maxima).

    It is 1 exactly when the motion succeeds (executed to the end, every measure within its bound) and falls in
    proportion as a measure exceeds its bound (a planted foot sliding at twice the allowed speed halves it), so a
    group of samples that all fail still ranks them: what a policy-gradient update needs when almost every sample
    of the prior fails (a binary reward then gives all-zero groups and no advantage). A measure at or below its bound
    (negative ones included) contributes 1; a NaN measure or a positive measure over a zero bound contributes 0.

    Raises:
        ValueError: ``survival`` outside [0, 1] or a negative or non-finite bound.
    """
    if not 0.0 <= survival <= 1.0:
        raise ValueError(f"survival must be in [0, 1], got {survival!r}.")
    score = survival
    for measure, bound in measures:
        if not (math.isfinite(bound) and bound >= 0):
            raise ValueError(f"bounds must be finite and >= 0, got {bound!r}.")
        if math.isnan(measure):
            return 0.0
        if measure > bound:
            score *= bound / measure  # 0 for a zero bound, and for an infinite measure
    return score
