"""Test-time optimisation (TTO) of sampled body motions (docs/ego_motion_eval.md, the aleph rows).

Why: the diffusion prior samples each window in about 30 network evaluations and nothing ties its
output to physics: planted feet slide a little and joints jitter from frame to frame. A short
optimisation after sampling keeps the sample's pose but trades a small change of the local joint
rotations for smoother motion and feet that stay put while the model says they touch the floor.
The head trajectory is never touched: the pelvis is recovered from the CPF by kinematics
(``BodyModel.root_from_cpf``) for every candidate pose, so the head stays exactly where the
headset says it is.

Variables: a tangent-space residual per joint and frame, ``delta`` (B, T, 21, 3) in radians, with

    R[b, t, j] = R_sampled[b, t, j] @ exp(delta[b, t, j])          (starts at delta = 0)

so every iterate is a rotation by construction and ``|delta|`` is the geodesic angle to the
sample. Betas are fixed at their per-sequence mean over frames (the prior predicts them per frame).

Objective per sequence (each term a mean over its frames of a per-frame sum over joints; positions
are world metres from forward kinematics with the root recovered from the head; one "step" is one
frame at the data rate, 30 fps, so velocities are metres per frame and nothing depends on fps):

    rotation_prior        1 x  sum_j |delta_tj|^2                                 rad^2
    torso_position_prior  5 x  sum_{j in torso} |p_tj - p^s_tj|^2                  m^2
    rotation_smoothness   1 x  sum_j 1/2 ||R_{t+1,j} - R_tj||_F^2  (~ angle^2)     rad^2
    position_smoothness  10 x  sum_j |(p - p^s)_{t+1,j} - (p - p^s)_tj|^2          m^2
    velocity_smoothness   5 x  sum_j |p_{t+1,j} - 2 p_tj + p_{t-1,j}|^2            m^2
    foot_skating         30 x  sum_{f in feet} c_tf c_{t+1,f} |xy(p_{t+1,f} - p_tf)|^2   m^2

with p^s the sample's joints, the 22 joints pelvis + 21 body joints, torso = pelvis, left/right
hip, spine1-3, neck, left/right collar (``TORSO_JOINTS``), feet = left/right ankle and left/right
foot (toe) (``metrics.FOOT_JOINTS``), c the predicted contact probabilities of those joints and
xy the horizontal (world x, y) part. The weights are the paper's (docs/ego_motion_eval.md).

Two readings of the spec are fixed here and stated so they can be changed deliberately:

- ``position_smoothness`` penalises first differences of the *correction* p - p^s (the default,
  ``position_smoothness_of="correction"``), i.e. it keeps joint velocities near the sample's,
  instead of penalising world joint velocities themselves (``"motion"``, the literal reading).
  At weight 10 the literal term damps every real movement (strides, arm swing) and pulls each
  joint's first and last frames together. Measured on the bundled CMU walk 002_02 (60 frames,
  ground-truth contacts, default optimiser): TTO of the ground truth moves the joints by 3.5 mm
  MPJPE with "correction" and 47 mm with "motion"; of the ground truth with 1.7 deg rotation
  noise per joint and frame (41.9 mm), it lands at 23.8 mm vs 36.6 mm. The literal term removes
  more jitter (5398 -> 439 m/s^3 vs -> 1878; ground truth 232), and helps pin sliding feet.
- ``foot_skating`` weights a step t -> t+1 by c_t c_{t+1}, the probability that the joint is in
  contact at both ends if the two are independent: the step that lands or lifts a foot is free.

Frame alignment: the prior's window holds T+1 head poses for T motion frames and motion frame t
belongs to head pose t+1 (``windows.iter_windows``, ``condition.raw_head_features``). ``T_world_cpf``
may be given either way: with T+1 poses the first is dropped, with T poses they are used as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from typing_extensions import assert_never

from tasks.ego_motion.body.body_model import BodyModel
from tasks.ego_motion.body.geometry import FOOT_JOINTS, NUM_BODY_JOINTS, NUM_METRIC_JOINTS, axis_angle_to_matrix

TORSO_JOINTS: tuple[int, ...] = (0, 1, 2, 3, 6, 9, 12, 13, 14)
"""SMPL-H indices of pelvis, left_hip, right_hip, spine1, spine2, spine3, neck, left_collar, right_collar."""
FOOT_CONTACT_INDICES: tuple[int, ...] = tuple(j - 1 for j in FOOT_JOINTS)
"""Columns of the (..., 21) contact vector (SMPL-H joints 1..21) that belong to ``FOOT_JOINTS``."""
LOSS_TERMS: tuple[str, ...] = (
    "rotation_prior",
    "torso_position_prior",
    "rotation_smoothness",
    "position_smoothness",
    "velocity_smoothness",
    "foot_skating",
)
"""Names of the objective's terms, in the order of the module docstring and of ``TTOConfig``'s weights."""


@dataclass(frozen=True)
class TTOConfig:
    """Weights and optimiser settings of the test-time optimisation; defaults are the paper's weights.

    Every weight multiplies the term of the same name in :data:`LOSS_TERMS` (units in the module
    docstring); 0 switches a term off.
    """

    rotation_prior_weight: float = 1.0
    """Closeness of each local rotation to the sampled one (squared geodesic angle, rad^2)."""
    torso_position_prior_weight: float = 5.0
    """Closeness of the torso joints' world positions to the sample's (m^2)."""
    rotation_smoothness_weight: float = 1.0
    """First differences of local rotations over time (~ squared angle per frame, rad^2)."""
    position_smoothness_weight: float = 10.0
    """First differences over time of the joint positions or of their correction (``position_smoothness_of``), m^2."""
    velocity_smoothness_weight: float = 5.0
    """Second differences over time of world joint positions (acceleration per frame^2), m^2."""
    foot_skating_weight: float = 30.0
    """Contact-weighted squared horizontal step of the ankles and toes (m^2)."""
    position_smoothness_of: Literal["correction", "motion"] = "correction"
    """'correction': first differences of p - p_sampled (no pull on real motion); 'motion': of p itself."""
    optimizer: Literal["lbfgs", "lbfgs_per_sequence", "adam"] = "lbfgs"
    """'lbfgs': torch.optim.LBFGS with strong-Wolfe line search on the batch's summed objective: the objective
    never goes up, but the curvature history and the line search are shared by the batch, so a sequence's result
    depends on its batch mates (centimetres of joint position: docs/ego_motion_rlpf.md, "Post-training for the
    refined motion"). 'lbfgs_per_sequence': the same, one optimisation per sequence: independent of the batch, at
    several times the time of one batched run. 'adam': torch.optim.Adam, each sequence independent of the batch,
    but its fixed-size first steps can make an already smooth sample worse; it needs ~100 steps (set
    learning_rate=0.01)."""
    num_iterations: int = 30
    """L-BFGS iterations (about 1.1 objective evaluations each) or Adam steps."""
    learning_rate: float = 1.0
    """L-BFGS initial step length (1.0, its natural scale) or Adam's step size in radians (0.01)."""
    lbfgs_history_size: int = 20
    """Number of past updates L-BFGS keeps for its curvature estimate."""

    def __post_init__(self) -> None:
        weights = {name: getattr(self, f"{name}_weight") for name in LOSS_TERMS}
        bad = {k: v for k, v in weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"TTO weights must be finite and >= 0, got {bad}; use 0 to switch a term off.")
        if self.position_smoothness_of not in ("correction", "motion"):
            raise ValueError(
                f"position_smoothness_of must be 'correction' or 'motion', got {self.position_smoothness_of!r}."
            )
        if self.optimizer not in ("lbfgs", "lbfgs_per_sequence", "adam"):
            raise ValueError(f"optimizer must be 'lbfgs', 'lbfgs_per_sequence' or 'adam', got {self.optimizer!r}.")
        if self.num_iterations < 0:
            raise ValueError(f"num_iterations must be >= 0 (0 returns the sample), got {self.num_iterations}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive and finite, got {self.learning_rate}.")
        if self.lbfgs_history_size < 1:
            raise ValueError(f"lbfgs_history_size must be >= 1, got {self.lbfgs_history_size}.")

    def weights(self) -> dict[str, float]:
        """{term name: weight} in :data:`LOSS_TERMS` order."""
        return {name: getattr(self, f"{name}_weight") for name in LOSS_TERMS}


@dataclass(frozen=True)
class TTOResult:
    """Refined motion and the objective before and after.

    body_rotmats: (B, T, 21, 3, 3) refined local rotations of SMPL-H joints 1..21.
    T_world_root: (B, T, 4, 4) pelvis poses recovered from the head for the refined rotations.
    joints_world: (B, T, 22, 3) pelvis + 21 body joints, world metres.
    initial_losses / final_losses: {term: (B,)} unweighted terms (units in the module docstring)
        at the sample and at the result; multiply by ``TTOConfig.weights()`` for the objective.
    initial_objective / final_objective: (B,) weighted sums.
    """

    body_rotmats: Float[Tensor, "B T 21 3 3"]
    T_world_root: Float[Tensor, "B T 4 4"]
    joints_world: Float[Tensor, "B T 22 3"]
    initial_losses: dict[str, Tensor]
    final_losses: dict[str, Tensor]
    initial_objective: Float[Tensor, " B"]
    final_objective: Float[Tensor, " B"]


@dataclass(frozen=True)
class _Problem:
    """Everything constant during the optimisation, aligned to the T motion frames."""

    body: BodyModel
    T_world_cpf: Tensor  # (B, T, 4, 4)
    betas: Tensor  # (B, 1, num_betas), broadcast over frames
    rotmats_sampled: Tensor  # (B, T, 21, 3, 3)
    joints_sampled: Tensor  # (B, T, 22, 3)
    pair_contacts: Tensor  # (B, T-1, 4) c_t * c_{t+1} of the foot joints
    cfg: TTOConfig


def _pose(body: BodyModel, T_world_cpf: Tensor, betas: Tensor, rotmats: Tensor) -> tuple[Tensor, Tensor]:
    """Root from the head, then joints: -> T_world_root (B, T, 4, 4), joints (B, T, 22, 3) world metres."""
    T_world_root = body.root_from_cpf(T_world_cpf, rotmats, betas)
    fk = body.forward_kinematics(rotmats, betas=betas, T_world_root=T_world_root)
    return T_world_root, fk.t_world_joint[..., :NUM_METRIC_JOINTS, :]


def _loss_terms(problem: _Problem, delta: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
    """Unweighted terms {name: (B,)} for residual rotations ``delta`` (B, T, 21, 3); also R, root, joints."""
    R = problem.rotmats_sampled @ axis_angle_to_matrix(delta)  # (B, T, 21, 3, 3)
    T_world_root, p = _pose(problem.body, problem.T_world_cpf, problem.betas, R)  # (B, T, 22, 3)
    p_s = problem.joints_sampled
    torso = list(TORSO_JOINTS)
    terms: dict[str, Tensor] = {
        "rotation_prior": delta.square().sum(dim=(-1, -2)).mean(-1),
        "torso_position_prior": (p[..., torso, :] - p_s[..., torso, :]).square().sum(dim=(-1, -2)).mean(-1),
    }
    # 1/2 ||R_{t+1} - R_t||_F^2 = 3 - tr(R_t^T R_{t+1}) = 2 (1 - cos angle) ~ angle^2.
    dR = R[:, 1:] - R[:, :-1]  # (B, T-1, 21, 3, 3)
    terms["rotation_smoothness"] = _mean_or_zero(0.5 * dR.square().sum(dim=(-1, -2, -3)))
    match problem.cfg.position_smoothness_of:
        case "correction":
            smoothed = p - p_s
        case "motion":
            smoothed = p
        case _:
            assert_never(problem.cfg.position_smoothness_of)
    terms["position_smoothness"] = _mean_or_zero(smoothed.diff(dim=1).square().sum(dim=(-1, -2)))
    terms["velocity_smoothness"] = _mean_or_zero(p.diff(n=2, dim=1).square().sum(dim=(-1, -2)))
    feet_xy = p[..., list(FOOT_JOINTS), :2]  # (B, T, 4, 2)
    step_sq = feet_xy.diff(dim=1).square().sum(-1)  # (B, T-1, 4)
    terms["foot_skating"] = _mean_or_zero((problem.pair_contacts * step_sq).sum(-1))
    return terms, R, T_world_root, p


def _mean_or_zero(per_frame: Tensor) -> Tensor:
    """(B, N) -> (B,) mean over N; 0 when a clip is too short for the difference (N = 0)."""
    if per_frame.shape[1] == 0:
        return per_frame.new_zeros(per_frame.shape[0])
    return per_frame.mean(dim=1)


def _objective(terms: dict[str, Tensor], cfg: TTOConfig) -> Tensor:
    """(B,) weighted sum of the terms."""
    return sum(w * terms[name] for name, w in cfg.weights().items())  # type: ignore[return-value]


def _align_inputs(T_world_cpf: Tensor, betas: Tensor, body_rotmats: Tensor, contacts: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes; return T_world_cpf (B, T, 4, 4) for the motion frames and betas (B, 1, nb)."""
    if body_rotmats.ndim != 5 or tuple(body_rotmats.shape[2:]) != (NUM_BODY_JOINTS, 3, 3):
        raise ValueError(
            f"body_rotmats must be (B, T, 21, 3, 3) local rotations of SMPL-H joints 1..21, got "
            f"{tuple(body_rotmats.shape)}; drop hand joints with [:, :, :21]."
        )
    B, T = body_rotmats.shape[:2]
    if T < 1:
        raise ValueError("body_rotmats has no frames; TTO needs at least one.")
    if T_world_cpf.ndim != 4 or T_world_cpf.shape[0] != B or tuple(T_world_cpf.shape[2:]) != (4, 4):
        raise ValueError(f"T_world_cpf must be (B={B}, T+1 or T, 4, 4) head poses, got {tuple(T_world_cpf.shape)}.")
    if T_world_cpf.shape[1] == T + 1:
        T_world_cpf = T_world_cpf[:, 1:]  # motion frame t belongs to head pose t+1
    elif T_world_cpf.shape[1] != T:
        raise ValueError(
            f"T_world_cpf has {T_world_cpf.shape[1]} poses for {T} motion frames; pass the window's "
            f"T+1 = {T + 1} poses (the first one only conditions frame 0) or the T aligned ones."
        )
    if betas.ndim == 3:
        if betas.shape[:2] != (B, T):
            raise ValueError(f"per-frame betas must be (B={B}, T={T}, nb), got {tuple(betas.shape)}.")
        betas = betas.mean(dim=1)  # fixed at the per-sequence mean
    if betas.ndim != 2 or betas.shape[0] != B:
        raise ValueError(f"betas must be (B={B}, nb) or (B, T, nb), got {tuple(betas.shape)}.")
    if tuple(contacts.shape) != (B, T, NUM_BODY_JOINTS):
        raise ValueError(
            f"contacts must be (B={B}, T={T}, 21) probabilities of SMPL-H joints 1..21, got {tuple(contacts.shape)}."
        )
    for name, x in (("T_world_cpf", T_world_cpf), ("betas", betas), ("body_rotmats", body_rotmats),
                    ("contacts", contacts)):  # fmt: skip
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or infinite values; TTO cannot repair those, fix the sample.")
    eye = torch.eye(3, dtype=body_rotmats.dtype, device=body_rotmats.device)
    ortho_err = (body_rotmats.transpose(-1, -2) @ body_rotmats - eye).abs().amax()
    if ortho_err > 1e-3 or (torch.linalg.det(body_rotmats) < 0).any():
        raise ValueError(
            f"body_rotmats are not rotations (max |R^T R - I| = {float(ortho_err):.2g} or det < 0); "
            "project the sample onto SO(3) first with geometry.project_to_so3."
        )
    return T_world_cpf, betas[:, None, :]


def optimize_motion(
    body: BodyModel,
    T_world_cpf: Float[Tensor, "B Tc 4 4"],
    betas: Float[Tensor, "B *T nb"],
    body_rotmats: Float[Tensor, "B T 21 3 3"],
    contacts: Float[Tensor, "B T 21"],
    cfg: TTOConfig | None = None,
) -> TTOResult:
    """Refine sampled local joint rotations for smoothness and foot contact, root kept on the head.

    Args:
        body: the body model the prior was trained with.
        T_world_cpf: (B, T+1, 4, 4) the window's head poses (the first one, which only conditions
            frame 0, is dropped) or (B, T, 4, 4) poses aligned with the motion frames; world
            metres, +Z up, floor at z = 0.
        betas: (B, T, nb) per-frame betas as sampled (averaged over frames) or (B, nb).
        body_rotmats: (B, T, 21, 3, 3) sampled local rotations of SMPL-H joints 1..21 (rotations to
            1e-3; the sampler's SVD projection gives that).
        contacts: (B, T, 21) predicted contact probabilities of joints 1..21; only the ankles and
            toes are used. Values are clamped into [0, 1] (the prior's raw output may overshoot).
        cfg: weights and optimiser; defaults to the paper's weights with 30 L-BFGS iterations.

    Returns:
        :class:`TTOResult` with the refined rotations, the recovered root and joints, and the
        per-term losses before and after. Deterministic; works inside the caller's
        ``torch.no_grad()`` (gradients are enabled locally and nothing returned requires grad).
    """
    cfg = cfg if cfg is not None else TTOConfig()
    T_world_cpf, betas = _align_inputs(T_world_cpf, betas, body_rotmats, contacts)
    dtype = body_rotmats.dtype
    T_world_cpf, betas = T_world_cpf.detach().to(dtype), betas.detach().to(dtype)
    rotmats_sampled = body_rotmats.detach()
    c_feet = contacts.detach().to(dtype).clamp(0.0, 1.0)[..., list(FOOT_CONTACT_INDICES)]  # (B, T, 4)
    with torch.no_grad():
        _, joints_sampled = _pose(body, T_world_cpf, betas, rotmats_sampled)
    problem = _Problem(
        body=body,
        T_world_cpf=T_world_cpf,
        betas=betas,
        rotmats_sampled=rotmats_sampled,
        joints_sampled=joints_sampled,
        pair_contacts=c_feet[:, 1:] * c_feet[:, :-1],
        cfg=cfg,
    )
    delta = torch.zeros(*body_rotmats.shape[:3], 3, dtype=dtype, device=body_rotmats.device)
    with torch.no_grad():
        initial_losses = _loss_terms(problem, delta)[0]
    if cfg.num_iterations > 0 and cfg.optimizer == "lbfgs_per_sequence":
        delta = torch.cat([_run_optimizer(_row(problem, b), delta[b:b + 1]) for b in range(len(delta))])
    elif cfg.num_iterations > 0:
        delta = _run_optimizer(problem, delta)
    with torch.no_grad():
        final_losses, R, T_world_root, joints = _loss_terms(problem, delta)
    return TTOResult(
        body_rotmats=R,
        T_world_root=T_world_root,
        joints_world=joints,
        initial_losses=initial_losses,
        final_losses=final_losses,
        initial_objective=_objective(initial_losses, cfg),
        final_objective=_objective(final_losses, cfg),
    )


def _row(problem: _Problem, b: int) -> _Problem:
    """The problem of sequence ``b`` alone (batch of one)."""
    return _Problem(body=problem.body, T_world_cpf=problem.T_world_cpf[b:b + 1], betas=problem.betas[b:b + 1],
                    rotmats_sampled=problem.rotmats_sampled[b:b + 1], joints_sampled=problem.joints_sampled[b:b + 1],
                    pair_contacts=problem.pair_contacts[b:b + 1], cfg=problem.cfg)


def _run_optimizer(problem: _Problem, delta0: Tensor) -> Tensor:
    """Minimise the summed (over the batch) objective over ``delta``; returns the detached optimum.

    The sequences are independent, so summing their objectives gives each its own gradient; Adam's
    per-coordinate steps keep them fully independent, L-BFGS shares its curvature history and line
    search across the batch (the two-loop recursion's scalars and the step length are the batch's), so a
    sequence's optimum depends on its batch mates; ``optimize_motion`` runs 'lbfgs_per_sequence' one sequence at a
    time through here.
    """
    cfg = problem.cfg
    with torch.enable_grad():
        delta = delta0.clone().requires_grad_(True)

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=False)
            loss = _objective(_loss_terms(problem, delta)[0], cfg).sum()
            loss.backward()
            return loss

        match cfg.optimizer:
            case "lbfgs" | "lbfgs_per_sequence":
                optimizer: torch.optim.Optimizer = torch.optim.LBFGS(
                    [delta],
                    lr=cfg.learning_rate,
                    max_iter=cfg.num_iterations,
                    history_size=cfg.lbfgs_history_size,
                    tolerance_grad=1e-12,
                    tolerance_change=1e-15,
                    line_search_fn="strong_wolfe",
                )
                optimizer.step(closure)
            case "adam":
                optimizer = torch.optim.Adam([delta], lr=cfg.learning_rate)
                for _ in range(cfg.num_iterations):
                    optimizer.step(closure)
            case _:
                assert_never(cfg.optimizer)
    return delta.detach()


__all__ = [
    "FOOT_CONTACT_INDICES",
    "LOSS_TERMS",
    "TORSO_JOINTS",
    "TTOConfig",
    "TTOResult",
    "optimize_motion",
]
