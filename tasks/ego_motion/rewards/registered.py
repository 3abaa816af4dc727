"""Registered rewards of the ego-motion task (docs/ego_motion_rewards.md; the physics ones: docs/ego_motion_rlpf.md).

Why one registered reward per term: MotionGRPO normalises every sub-reward within its group
before summing the advantages, so rotation, position, aligned position, velocity and visual
rewards must reach the advantage code as separate names (``--grpo.rewards ego_rot ego_pos ...``).
Each joint-level reward squashes one error against the ground truth to (0, 1]:

    R = exp(-omega * error),    error = 0  ->  R = 1,

with a default omega that puts a demo prior's errors at the start of post-training near the
middle of that range (the numbers and the reasoning are in ``docs/ego_motion_rewards.md``).

Inputs (N samples = conditions x group members, T motion frames at ``fps``, world metres, +Z up):

- ``decoded``: :meth:`EgoMotionTask.decode`'s dict; read here: ``joints_world`` (N, T, 22, 3)
  pelvis + 21 body joints and ``body_rotmats`` (N, T, 21, 3, 3) local rotations.
- ``batch``: the expanded batch the samples were conditioned on; read here: ground truth
  ``joints_world`` (N, T, 22, 3), ``body_rotmats`` (N, T, 21, 3, 3), and the (possibly perturbed)
  head ``T_world_cpf`` (N, T+1, 4, 4) for the perceptual reward.

Every reward runs under ``torch.no_grad()``, computes in at least float32 and returns a float32
(N,) tensor. The error definitions are public functions so the tests, docs and evaluation can
check the exact number a reward squashes; metrics shared with the evaluation (alignment,
geodesic angle, ground penetration, foot skating) come from ``metrics.py``, not a copy.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Literal, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from diffgrpo.rewards import Reward, register_reward
from tasks.ego_motion.body.geometry import NUM_BODY_JOINTS
from tasks.ego_motion.data.amass import TARGET_FPS
from tasks.ego_motion.evaluation import metrics
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator
from tasks.ego_motion.physics.tracking import TrackingConfig
from tasks.ego_motion.rewards.perceptual import perceptual_reward

logger = logging.getLogger(__name__)
J = metrics.NUM_METRIC_JOINTS  # 22 = pelvis + 21 body joints

# Default omegas: a demo prior's typical error at the start of post-training gives R ~ 0.5, the
# plausible range R ~ 0.2-0.9; measurements and reasoning in docs/ego_motion_rewards.md.
OMEGA_ROT_L1 = 8.0
"""Default omega of ``ego_rot`` with ``error="l1"`` (per rotation-matrix entry, unitless)."""
OMEGA_ROT_GEODESIC = 3.0
"""Default omega of ``ego_rot`` with ``error="geodesic"`` (1/rad)."""
OMEGA_POS = 10.0
"""Default omega of ``ego_pos`` (1/m^2)."""
OMEGA_PA_POS = 30.0
"""Default omega of ``ego_pa_pos`` (1/m^2): aligned errors are smaller, so the scale is steeper."""
OMEGA_VEL = 0.7
"""Default omega of ``ego_vel`` (s^2/m^2)."""
OMEGA_PHYSICS = 1.5
"""Default omega of ``ego_physics`` (1/m, error in metres, see :func:`physics_error`)."""
PENETRATION_WEIGHT = 10.0
"""Default weight of ground penetration against foot skating in :func:`physics_error` (unitless)."""
OMEGA_PERCEPTUAL = 1.0
"""Default perceptual_omega of ``ego_perceptual``: R_vis = exp(perceptual_omega * s), s in [-1, 1]."""
GROUND_TRUTH_REWARDS = ("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel")
"""The rewards that compare a sample with the window's body ground truth (the joint rewards); the others
read only the sample, the floor and the head trajectory, so they can post-train on heads alone."""
OMEGA_RESIDUAL = 1.0
"""Default omega of ``physics_residual`` (unitless: the error is a fraction of body weight)."""
OMEGA_CONTACT = 5.0
"""Default omega of ``physics_contact`` (1/m)."""
OMEGA_PLANTED = 1.0 / TrackingConfig.max_planted_foot_speed_m_per_s
"""Default omega of ``physics_planted`` (s/m): 1 / the success criterion's bound on the planted feet's speed
(2 s/m at its 0.5 m/s), so a motion whose planted feet slide at the bound scores exp(-1)."""


# ----------------------------------------------------------------------------------------------
# Input validation


def _get(source: Mapping[str, Tensor], source_name: str, key: str, expected: str) -> Tensor:
    if not isinstance(source, Mapping) or key not in source:
        keys = sorted(source) if isinstance(source, Mapping) else type(source).__name__
        raise KeyError(f"{source_name}[{key!r}] is missing (have {keys}); the ego-motion rewards need "
                       f"{source_name}[{key!r}] of shape {expected}.")
    value = source[key]
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise ValueError(f"{source_name}[{key!r}] must be a floating-point tensor of shape {expected}, "
                         f"got {type(value).__name__} {getattr(value, 'dtype', '')}.")
    return value


def _pred_and_truth(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor], key: str,
                    trailing: tuple[int, ...], min_frames: int = 1) -> tuple[Tensor, Tensor]:
    """decoded[key] and batch[key], both (N, T, *trailing), in a common dtype of at least float32."""
    expected = "(N, T, " + ", ".join(map(str, trailing)) + ")"
    pred = _get(decoded, "decoded", key, expected)
    gt = _get(batch, "batch", key, expected)
    if pred.ndim != 2 + len(trailing) or tuple(pred.shape[2:]) != trailing:
        raise ValueError(f"decoded[{key!r}] has shape {tuple(pred.shape)}, expected {expected}; decode final "
                         "samples with task.decode (not decode_x0's extra axes) and drop hand joints.")
    if gt.shape != pred.shape:
        raise ValueError(f"batch[{key!r}] has shape {tuple(gt.shape)} but decoded[{key!r}] has "
                         f"{tuple(pred.shape)}; expand the ground truth to one row per sample "
                         "(repeat_interleave over the group) and use the same window length.")
    if pred.shape[1] < min_frames:
        raise ValueError(f"decoded[{key!r}] has {pred.shape[1]} frame(s); this reward needs at least {min_frames}.")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    return pred.to(dtype), gt.to(device=pred.device, dtype=dtype)


def _check_omega(omega: float, name: str = "omega") -> float:
    if not (isinstance(omega, (int, float)) and math.isfinite(omega) and omega > 0):
        raise ValueError(f"{name}={omega!r} must be a finite number > 0.")
    return float(omega)


def _check_fps(fps: float) -> float:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps={fps!r} must be a positive finite frame rate (the data's is {TARGET_FPS}).")
    return float(fps)


# ----------------------------------------------------------------------------------------------
# Errors (what each reward squashes), each (N,)


def rotation_l1_error(pred_R: Float[Tensor, "N T 21 3 3"], gt_R: Float[Tensor, "N T 21 3 3"]) -> Float[Tensor, " N"]:
    """Mean absolute difference of local rotation-matrix entries, unitless in [0, 2].

    mean over T frames, 21 body joints and 9 entries of |R_pred - R_gt|. A rotation by theta about
    one axis differs from the identity by 2 (1 - cos theta) + 2 |sin theta| over its 9 entries.
    """
    return (pred_R - gt_R).abs().mean(dim=(1, 2, 3, 4))


def rotation_geodesic_error(pred_R: Float[Tensor, "N T 21 3 3"], gt_R: Float[Tensor, "N T 21 3 3"]
                            ) -> Float[Tensor, " N"]:
    """Mean geodesic angle of R_gt^T R_pred in radians over T frames and 21 body joints (MPJRE / 57.3)."""
    return torch.deg2rad(metrics.mpjre(pred_R, gt_R))


def position_mse(pred: Float[Tensor, "N T 22 3"], gt: Float[Tensor, "N T 22 3"]) -> Float[Tensor, " N"]:
    """Mean squared joint position error in m^2: mean over T frames and 22 joints of ||p - g||^2."""
    return (pred - gt).pow(2).sum(dim=-1).mean(dim=(1, 2))


def aligned_position_mse(pred: Float[Tensor, "N T 22 3"], gt: Float[Tensor, "N T 22 3"]) -> Float[Tensor, " N"]:
    """:func:`position_mse` in m^2 after aligning each predicted frame onto the ground truth.

    Per frame, the least-squares similarity (rotation, translation, scale) over the 22 joints maps
    the prediction onto the ground truth (``metrics.umeyama_similarity``, the direction PA-MPJPE uses).
    """
    aligned = metrics.umeyama_similarity(pred, gt).apply(pred)  # (N, T, 22, 3)
    return position_mse(aligned, gt)


def velocity_mse(pred: Float[Tensor, "N T 22 3"], gt: Float[Tensor, "N T 22 3"], fps: float) -> Float[Tensor, " N"]:
    """Mean squared joint velocity error in (m/s)^2, velocities (x[t+1] - x[t]) * fps (as MPJVE).

    mean over the T-1 differences and 22 joints of ||v_pred - v_gt||^2. Needs T >= 2.
    """
    dv = (pred.diff(dim=1) - gt.diff(dim=1)) * fps  # (N, T-1, 22, 3) m/s
    return dv.pow(2).sum(dim=-1).mean(dim=(1, 2))


def physics_error(joints: Float[Tensor, "N T 22 3"], fps: float,
                  penetration_weight: float = PENETRATION_WEIGHT) -> Float[Tensor, " N"]:
    """Implausibility of a motion on its own, in metres: weighted ground penetration + foot-skating rate.

    error = penetration_weight * GP + FS / duration * (1 s), with GP ``metrics.ground_penetration``
    (mean depth of the 4 foot joints below z = 0, m) and FS ``metrics.foot_skating`` (height-weighted
    foot slide summed over the clip, m) divided by the duration (T - 1) / fps: the slide per second
    of motion, so the error does not grow with the window length. Why the weight: GP is a mean over
    all frames (about 1 cm for a floating-then-sinking prediction) while the skating rate of real
    walking is already about 0.3 m/s; unweighted, sinking into the floor would hardly count.
    Needs T >= 2.
    """
    duration_s = (joints.shape[1] - 1) / fps
    skating_rate = metrics.foot_skating(joints) / duration_s  # (N,) m/s
    return penetration_weight * metrics.ground_penetration(joints) + skating_rate  # rate x 1 s -> m


# ----------------------------------------------------------------------------------------------
# Registered rewards


@register_reward("ego_rot")
def ego_rot(omega: float | None = None, error: Literal["l1", "geodesic"] = "l1") -> Reward:
    """R_rot = exp(-omega * rotation error) of the 21 local body-joint rotations.

    ``error="l1"`` (default, the paper's "L1"): :func:`rotation_l1_error`, per matrix entry,
    default omega ``OMEGA_ROT_L1``. ``error="geodesic"``: :func:`rotation_geodesic_error` in
    radians, default omega ``OMEGA_ROT_GEODESIC``.
    """
    if error == "l1":
        error_fn, default = rotation_l1_error, OMEGA_ROT_L1
    elif error == "geodesic":
        error_fn, default = rotation_geodesic_error, OMEGA_ROT_GEODESIC
    else:
        raise ValueError(f"error={error!r} is not a rotation error; use 'l1' (matrix entries) or 'geodesic' (rad).")
    w = _check_omega(default if omega is None else omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        pred, gt = _pred_and_truth(decoded, batch, "body_rotmats", (NUM_BODY_JOINTS, 3, 3))
        return torch.exp(-w * error_fn(pred, gt)).float()

    return reward


@register_reward("ego_pos")
def ego_pos(omega: float = OMEGA_POS) -> Reward:
    """R_pos = exp(-omega * :func:`position_mse`) of the 22 world joints (no alignment: the root
    comes from the head, so global errors are part of the task)."""
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        pred, gt = _pred_and_truth(decoded, batch, "joints_world", (J, 3))
        return torch.exp(-w * position_mse(pred, gt)).float()

    return reward


@register_reward("ego_pa_pos")
def ego_pa_pos(omega: float = OMEGA_PA_POS) -> Reward:
    """R'_pos = exp(-omega * :func:`aligned_position_mse`): the body's pose, regardless of where the
    whole body stands, faces or how tall it is."""
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        pred, gt = _pred_and_truth(decoded, batch, "joints_world", (J, 3))
        return torch.exp(-w * aligned_position_mse(pred, gt)).float()

    return reward


@register_reward("ego_vel")
def ego_vel(omega: float = OMEGA_VEL, fps: float = TARGET_FPS) -> Reward:
    """R_vel = exp(-omega * :func:`velocity_mse`) with velocities in m/s at ``fps`` frames per second."""
    w, rate = _check_omega(omega), _check_fps(fps)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        pred, gt = _pred_and_truth(decoded, batch, "joints_world", (J, 3), min_frames=2)
        return torch.exp(-w * velocity_mse(pred, gt, rate)).float()

    return reward


@register_reward("ego_physics")
def ego_physics(omega: float = OMEGA_PHYSICS, fps: float = TARGET_FPS,
                penetration_weight: float = PENETRATION_WEIGHT) -> Reward:
    """R_phys = exp(-omega * :func:`physics_error`): feet above the floor and not sliding.

    Why (docs/ego_motion_rlpf.md): a local, ground-truth-free plausibility reward in the spirit of
    RLPF's physics feedback. It reads only ``decoded["joints_world"]``, so it also scores samples
    whose window has no labels. The ground truth itself does not score 1 (real feet roll and
    slide a little while near the floor); the group normalisation only needs the ordering.
    """
    w, rate = _check_omega(omega), _check_fps(fps)
    if not (isinstance(penetration_weight, (int, float)) and math.isfinite(penetration_weight)
            and penetration_weight >= 0):
        raise ValueError(f"penetration_weight={penetration_weight!r} must be a finite number >= 0.")
    gp_weight = float(penetration_weight)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        joints = _get(decoded, "decoded", "joints_world", f"(N, T, {J}, 3)")
        if joints.ndim != 4 or tuple(joints.shape[2:]) != (J, 3) or joints.shape[1] < 2:
            raise ValueError(f"decoded['joints_world'] has shape {tuple(joints.shape)}, expected (N, T, {J}, 3) "
                             "with T >= 2 (foot skating needs a step).")
        joints = joints.to(torch.promote_types(joints.dtype, torch.float32))
        return torch.exp(-w * physics_error(joints, rate, gp_weight)).float()

    return reward


@runtime_checkable
class Scorer(Protocol):
    """What ``ego_perceptual`` needs of the perceptual model: ``perceptual.PerceptualTrainer`` fits."""

    def score(self, joints: Tensor, T_world_cpf: Tensor) -> Tensor:
        """(N, T, 22, 3) world joints and (N, T+1, 4, 4) head poses -> (N,) scores in [-1, 1]."""
        ...


@register_reward("ego_perceptual")
def ego_perceptual(scorer: Scorer, omega: float = OMEGA_PERCEPTUAL) -> Reward:
    """R_vis = exp(omega * s), s = ``scorer.score(decoded["joints_world"], batch["T_world_cpf"])``.

    Why a factory over the scorer object: the perceptual model trains online beside the policy, so the
    reward must call the live trainer, not a copy; ``PerceptualTrainer.score`` freezes it (eval
    mode, no gradients) while it scores. The head is the batch's (N, T+1, 4, 4) window, perturbed
    if the condition was, as the samples saw it. Squashing and the [-1, 1] check are
    ``perceptual.perceptual_reward``'s.
    """
    if not callable(getattr(scorer, "score", None)):
        raise ValueError(f"scorer {type(scorer).__name__} has no score(joints, T_world_cpf) method; pass the "
                         "perceptual.PerceptualTrainer, e.g. get_reward('ego_perceptual', scorer=trainer).")
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        joints = _get(decoded, "decoded", "joints_world", f"(N, T, {J}, 3)")
        head = _get(batch, "batch", "T_world_cpf", "(N, T+1, 4, 4)")
        if joints.ndim != 4 or tuple(joints.shape[2:]) != (J, 3):
            raise ValueError(f"decoded['joints_world'] has shape {tuple(joints.shape)}, expected (N, T, {J}, 3).")
        N, T = joints.shape[:2]
        if tuple(head.shape) != (N, T + 1, 4, 4):
            raise ValueError(f"batch['T_world_cpf'] has shape {tuple(head.shape)}, expected (N, T+1, 4, 4) = "
                             f"{(N, T + 1, 4, 4)}: the batch's head window (one pose more than the motion), "
                             "not decoded['T_world_cpf'].")
        scores = scorer.score(joints, head)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != (N,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"scorer.score returned {shape}, expected a tensor of shape ({N},).")
        return perceptual_reward(scores.float(), w).float()

    return reward


@register_reward("ego_visual")
def ego_visual(scorer: Scorer, omega: float = OMEGA_PERCEPTUAL) -> Reward:
    """Deprecated name of :func:`ego_perceptual` (the paper's "visual-level reward"), kept so that old
    commands and reward specs still build; logs a deprecation warning."""
    logger.warning("reward 'ego_visual' is deprecated; use 'ego_perceptual'")
    return ego_perceptual(scorer, omega)


# ----------------------------------------------------------------------------------------------
# Physics rewards on MuJoCo (RLPF's physical feedback, arXiv 2506.12769; physics/ for the measures)


@functools.lru_cache(maxsize=1)
def default_physics_evaluator() -> PhysicsEvaluator:
    """The evaluator the physics rewards share when none is passed: the default body model
    (``$DIFFGRPO_SMPLH_PATH`` or the bundled one) and ``PhysicsConfig()``; built on first use. A task
    on another body model (``--task.body-model-path``) must pass ``evaluator=PhysicsEvaluator(task.body)``
    (``recipes/rlpf_ego_motion.py`` does), or the humanoid's bones will not be the sample's."""
    from tasks.ego_motion.body.body_model import load_body_model

    return PhysicsEvaluator(load_body_model())


def _physics(evaluator: PhysicsEvaluator | None) -> PhysicsEvaluator:
    if evaluator is None:
        return default_physics_evaluator()
    if not callable(getattr(evaluator, "evaluate", None)):
        raise TypeError(f"evaluator must be a physics.evaluator.PhysicsEvaluator, got {type(evaluator).__name__}.")
    return evaluator


@register_reward("physics_residual")
def physics_residual(omega: float = OMEGA_RESIDUAL, evaluator: PhysicsEvaluator | None = None) -> Reward:
    """R = exp(-omega * (F_res / (m g) + tau_res / (m g x 1 m))): how little non-physical root help
    the motion needs (means over frames of the inverse-dynamics residual, ``physics/dynamics.py``).

    Ground-truth free: reads only the decoded body (``T_world_root``, ``body_rotmats``, ``betas``).
    """
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        m = _physics(evaluator).evaluate(decoded)
        return torch.exp(-w * (m["residual_force_per_weight"] + m["residual_torque_per_weight"])).float()

    return reward


@register_reward("physics_tracking")
def physics_tracking(mode: Literal["survival", "success", "graded"] = "survival",
                     evaluator: PhysicsEvaluator | None = None) -> Reward:
    """R = the fraction of frames the simulated balancing tracker follows before falling (``mode="survival"``),
    1/0 for RLPF's success criterion (``mode="success"``, RLPF's binary signal), or its graded form (``"graded"``:
    survival x the product of min(1, bound / measure) over the criteria, 1 iff success;
    ``physics/criterion.py``'s ``graded_success``); ``physics/tracking.py``."""
    if mode not in ("survival", "success", "graded"):
        raise ValueError(f"mode must be 'survival', 'success' or 'graded', got {mode!r}.")
    if evaluator is not None and not getattr(getattr(evaluator, "cfg", None), "simulate", True):
        raise ValueError("physics_tracking needs the tracker, but the evaluator was built with "
                         "PhysicsConfig(simulate=False); build it with simulate=True (--physics.simulate).")
    key = f"tracking_{mode}"

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return _physics(evaluator).evaluate(decoded)[key].float()

    return reward


@register_reward("physics_contact")
def physics_contact(omega: float = OMEGA_CONTACT, evaluator: PhysicsEvaluator | None = None) -> Reward:
    """R = exp(-omega * (penetration + floating + skating)), all in metres (``physics/plausibility.py``,
    PhysDiff's definitions on the humanoid's collision geoms)."""
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        m = _physics(evaluator).evaluate(decoded)
        return torch.exp(-w * (m["penetration_m"] + m["floating_m"] + m["skating_m"])).float()

    return reward


@register_reward("physics_planted")
def physics_planted(omega: float = OMEGA_PLANTED, evaluator: PhysicsEvaluator | None = None) -> Reward:
    """R = exp(-omega * v_planted): how little the sample's planted feet slide, v_planted the median horizontal
    speed of its foot points within ``TrackingConfig.planted_band_m`` of its own contact height (m/s,
    ``physics/criterion.py``'s ``planted_foot_speed``, the success criterion the prior's samples miss most;
    docs/ego_motion_rlpf.md).

    Why a reward of its own: inside the graded tracking reward this criterion is one factor of a product, so
    its group-normalised advantage is mixed with the others'; as a sub-reward it is normalised on its own
    (``diffgrpo.advantages``). Ground-truth free; read from the shared evaluator's result (no extra simulation).
    """
    w = _check_omega(omega)

    @torch.no_grad()
    def reward(decoded: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return torch.exp(-w * _physics(evaluator).evaluate(decoded)["tracking_planted_foot_speed_m_per_s"]).float()

    return reward
