"""One call that scores decoded motions with every physics measure: the home of the physics rewards' numbers.

``PhysicsEvaluator.evaluate(decoded)`` builds (or reuses) the humanoid of each sample's body
shape, converts its pose to MuJoCo coordinates and runs inverse dynamics (``dynamics.py``),
simulated tracking (``tracking.py``) and the plausibility measures (``plausibility.py``), on CPU,
one motion after another. The motion's forward kinematics are computed once, by the inverse
dynamics, and handed to the plausibility and the tracker; the MuJoCo data of recent humanoids are
reused (reset by each run). The three physics rewards read the same result, so it is computed once
per decoded batch (the last batch is memoised).

Rows are scored independently: a row with NaN or inf in ``T_world_root``, ``body_rotmats`` or
``betas``, or whose body shape gives no humanoid (a zero-length bone), cannot be simulated. It is
logged (the row, the input key and the reason), marked ``invalid = 1``, and gets the worst value of
every measure (success and survival 0, residuals and distances inf), so the physics rewards score
it 0 and a training loop goes on. Batch-level mistakes (a missing key, wrong shapes, a window too
short for the reference's derivatives) raise.

With ``refine`` (e.g. the ego prior's test-time optimisation, ``sampling.sampler.refine_decoded``) the measures grade
the motion a deployed pipeline outputs: the decoded batch is refined first, its finite rows only (finite in every
per-row tensor, e.g. the contacts the test-time optimisation reads too); a row with a non-finite value anywhere, or one
the refinement refuses (it raises ``ValueError``), is logged and scored invalid like a non-finite one. The rows are
refined in one call, so that a batch gets what the refinement gives that batch (the test-time optimisation's L-BFGS
shares its line search across the batch's rows, so a row's result depends on its batch); only when that call raises
``ValueError`` is each row refined on its own.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import mujoco
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..body.body_model import BodyModel
from ..data.windows import NUM_BETAS, TARGET_FPS
from .dynamics import InverseDynamicsConfig, inverse_dynamics
from .humanoid import NUM_HUMANOID_BODIES, Humanoid, HumanoidCache, HumanoidConfig
from .plausibility import PlausibilityConfig, plausibility
from .tracking import TrackingConfig, track

logger = logging.getLogger(__name__)

PHYSICS_METRIC_UNITS: dict[str, str] = {
    "residual_force_per_weight": "mean root residual force / (m g), unitless",
    "residual_torque_per_weight": "mean root residual torque / (m g x 1 m), unitless",
    "tracking_success": "1 if the balancing tracker executed every frame and every success criterion held, else 0",
    "tracking_graded": "survival x prod over the success criteria of min(1, bound / measure), in [0, 1]; 1 iff success",
    "tracking_pelvis_rise_m": "mean height of the simulated pelvis above the reference's, m",
    "tracking_planted_foot_speed_m_per_s": "median horizontal speed of the reference's planted foot points, m/s",
    "tracking_unexecuted_speed_m_per_s": "the reference's path length minus the simulated one, per joint, m/s",
    "tracking_survival": "fraction of frames tracked before falling",
    "tracking_error_m": "mean joint position error while tracking, m",
    "tracking_residual_per_weight": "mean root residual force the tracker applied / (m g), unitless",
    "tracking_residual_torque_per_weight": "mean root residual torque the tracker applied / (m g x 1 m), unitless",
    "tracking_assist_per_weight": "the same as tracking_residual_per_weight (the name of the earlier tracker's aid)",
    "penetration_m": "mean depth of the lowest geom point below the floor, m",
    "floating_m": "mean height of the lowest geom point above the floor beyond the float tolerance, m",
    "skating_m": "mean horizontal step of foot points in floor contact, m per frame",
    "invalid": "1 if the row could not be evaluated (non-finite input or no humanoid for its shape), else 0",
}
"""Every measure :meth:`PhysicsEvaluator.evaluate` returns, with its unit."""

SCRATCH_HUMANOIDS = 16
"""How many recently evaluated humanoids keep their simulation data (two ``MjData``, about 0.6 MB resident each after a
run) for their next motions. Like the tracker model's spring targets, which every tracking run edits, this data is the
evaluator's own: one evaluator is not for several threads at once."""


@dataclass(frozen=True)
class PhysicsConfig:
    """Everything the physics evaluation is parameterised by."""

    humanoid: HumanoidConfig = field(default_factory=HumanoidConfig)
    inverse_dynamics: InverseDynamicsConfig = field(default_factory=InverseDynamicsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    plausibility: PlausibilityConfig = field(default_factory=PlausibilityConfig)
    simulate: bool = True
    """Run the tracker (the slowest part); without it the tracking measures are NaN."""
    betas_decimals: int = 2
    """Body shapes equal to this many decimals share one humanoid."""

    def __post_init__(self) -> None:
        if self.betas_decimals < 0:
            raise ValueError(f"PhysicsConfig.betas_decimals must be >= 0, got {self.betas_decimals}.")


class PhysicsEvaluator:
    """Physics measures of decoded motions for one body model (SMPL-H through ``BodyModel``)."""

    def __init__(self, body: BodyModel, cfg: PhysicsConfig | None = None, fps: float = TARGET_FPS,
                 refine: Callable[[dict[str, Tensor]], Mapping[str, Tensor]] | None = None) -> None:
        """``refine(decoded) -> decoded``: applied to the batch's finite rows (a dict of their (n, ...) slices of
        every per-row tensor) before they are scored; it must return ``T_world_root`` and ``body_rotmats`` for those
        rows (module doc). None: the decoded motion is scored as it is."""
        self.body, self.cfg, self.fps, self.refine = body, cfg or PhysicsConfig(), float(fps), refine
        self.humanoids = HumanoidCache(self._rest_joints, self.cfg.humanoid, decimals=self.cfg.betas_decimals)
        # per recent humanoid (by identity, the humanoid kept with them): MjData of its model and of its tracker model,
        # reused by its next motions (each run resets them), least recently used first
        self._scratch: OrderedDict[int, tuple[Humanoid, mujoco.MjData, mujoco.MjData]] = OrderedDict()
        self._memo: tuple[tuple[Tensor, ...], tuple[int, ...], dict[str, Tensor]] | None = None

    def _scratch_data(self, humanoid: Humanoid) -> tuple[mujoco.MjData, mujoco.MjData]:
        """MjData of ``humanoid.model`` and of ``humanoid.tracker_model`` for one evaluation: those of its last
        evaluation when it is among the last :data:`SCRATCH_HUMANOIDS` humanoids evaluated (allocating one costs about
        0.6 ms; the inverse dynamics and the tracker reset them), new ones otherwise."""
        key = id(humanoid)
        if key in self._scratch:
            self._scratch.move_to_end(key)
        else:
            self._scratch[key] = (humanoid, mujoco.MjData(humanoid.model), mujoco.MjData(humanoid.tracker_model))
            if len(self._scratch) > SCRATCH_HUMANOIDS:
                self._scratch.popitem(last=False)
        return self._scratch[key][1:]

    def _rest_joints(self, betas: Tensor) -> Tensor:
        padded = torch.nn.functional.pad(betas.to(self.body.J_template), (0, self.body.num_betas - betas.shape[-1]))
        return self.body.shaped_joints(padded)[:NUM_HUMANOID_BODIES]

    @torch.no_grad()
    def evaluate(self, decoded: Mapping[str, Tensor]) -> dict[str, Float[Tensor, " N"]]:
        """Every measure of :data:`PHYSICS_METRIC_UNITS` per sample, float32 (N,).

        Args:
            decoded: ``EgoMotionTask.decode``'s dict; read: ``T_world_root`` (N, T, 4, 4) pelvis
                poses (world, metres, +Z up, floor z = 0), ``body_rotmats`` (N, T, 21, 3, 3) local
                rotations, ``betas`` (N, 16) shapes. T >= 3.

        Raises:
            KeyError / ValueError: a missing key, a wrong shape, or fewer frames than the tracker's
                smoothing window (``TrackingConfig.smoothing_frames``), named. Bad rows do not raise
                (module doc).
        """
        for key in ("T_world_root", "body_rotmats", "betas"):
            if key not in decoded:
                raise KeyError(f"decoded[{key!r}] is missing (have {sorted(decoded)}); pass EgoMotionTask.decode's "
                               "output to the physics evaluator.")
        T_world_root, rotmats, betas = decoded["T_world_root"], decoded["body_rotmats"], decoded["betas"]
        if T_world_root.ndim != 4 or rotmats.shape[:2] != T_world_root.shape[:2] or betas.shape != (
                T_world_root.shape[0], NUM_BETAS):
            raise ValueError(f"expected T_world_root (N, T, 4, 4), body_rotmats (N, T, 21, 3, 3), betas (N, "
                             f"{NUM_BETAS}); got {tuple(T_world_root.shape)}, {tuple(rotmats.shape)}, "
                             f"{tuple(betas.shape)}.")
        frames = T_world_root.shape[1]
        if frames < 3:
            raise ValueError(f"decoded windows have {frames} frames; the physics measures need at least 3 (finite "
                             "differences of the inverse dynamics).")
        if self.cfg.simulate and frames < self.cfg.tracking.smoothing_frames:
            raise ValueError(f"decoded windows have {frames} frames; the tracker's reference derivatives need at "
                             f"least TrackingConfig.smoothing_frames={self.cfg.tracking.smoothing_frames} (use longer "
                             "windows or a smaller --physics.tracking.smoothing-frames, odd and >= 5).")
        # the very same tensors, unmodified since (in-place edits bump a tensor's version): the last batch again
        inputs = (T_world_root, rotmats, betas)
        if self.refine is not None:  # which may read any of the batch's tensors
            inputs += tuple(value for _, value in sorted(decoded.items()) if isinstance(value, Tensor))
        versions = tuple(t._version for t in inputs)
        if (self._memo is not None and len(self._memo[0]) == len(inputs)
                and all(a is b for a, b in zip(self._memo[0], inputs, strict=True))
                and self._memo[1] == versions):
            return self._memo[2]
        if self.refine is not None:
            T_world_root, rotmats = self._refined(decoded)
        rows = [self._evaluate_row(n, T_world_root[n], rotmats[n], betas[n]) for n in range(T_world_root.shape[0])]
        out = {name: torch.tensor([row[name] for row in rows], dtype=torch.float32, device=T_world_root.device)
               for name in PHYSICS_METRIC_UNITS}  # on the batch's device, like every other reward
        self._memo = (inputs, versions, out)
        return out

    def _refined(self, decoded: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(T_world_root, body_rotmats) of ``decoded`` with its finite rows (finite in every per-row tensor) refined by
        ``self.refine`` (all at once; if that raises ``ValueError``, one row at a time). A row with a non-finite value
        in any per-row tensor, or one that still raises, is set to NaN: invalid."""
        T_world_root, rotmats = decoded["T_world_root"], decoded["body_rotmats"]
        N = T_world_root.shape[0]
        per_row = {key: value for key, value in decoded.items()
                   if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == N}

        def finite_rows(value: Tensor) -> Tensor:
            return torch.isfinite(value.reshape(N, -1)).all(dim=1).to(T_world_root.device)

        scored = ("T_world_root", "body_rotmats", "betas")
        finite = finite_rows(T_world_root) & finite_rows(rotmats) & finite_rows(decoded["betas"])  # else logged later
        T_world_root, rotmats = T_world_root.clone(), rotmats.clone()
        for key, value in sorted(per_row.items()):
            if key not in scored and value.is_floating_point():
                for n in torch.nonzero(finite & ~finite_rows(value)).flatten().tolist():
                    logger.warning("physics evaluation: row %d cannot be refined (decoded[%r][%d] has NaN or inf): "
                                   "scored as invalid", n, key, n)
                    T_world_root[n] = float("nan")
                    finite[n] = False

        def refine(rows: Tensor) -> None:
            out = self.refine({key: value[rows] for key, value in per_row.items()})
            T_world_root[rows], rotmats[rows] = out["T_world_root"].to(T_world_root), out["body_rotmats"].to(rotmats)

        rows = torch.nonzero(finite).flatten()
        if len(rows):
            try:
                refine(rows)
            except ValueError as error:
                logger.warning("physics evaluation: refining the batch failed (%s); refining row by row", error)
                for n in rows.tolist():
                    try:
                        refine(torch.tensor([n], device=rows.device))
                    except ValueError as row_error:
                        logger.warning("physics evaluation: row %d cannot be refined (%s): scored as invalid", n,
                                       row_error)
                        T_world_root[n] = float("nan")
        return T_world_root, rotmats

    def _evaluate_row(self, n: int, T_world_root: Tensor, body_rotmats: Tensor, betas: Tensor) -> dict[str, float]:
        """Row ``n``'s measures, or the worst values with ``invalid = 1`` when it cannot be evaluated."""
        reason = next((f"decoded[{key!r}][{n}] has NaN or inf" for key, value in
                       (("T_world_root", T_world_root), ("body_rotmats", body_rotmats), ("betas", betas))
                       if not torch.isfinite(value).all()), None)
        if reason is None:
            try:
                self.humanoids(betas)  # compiled and cached here, so that only this call's errors are caught
            except ValueError as error:  # build_humanoid: e.g. a zero-length bone
                reason = f"decoded['betas'][{n}] gives no humanoid: {error}"
            else:
                return self.evaluate_one(T_world_root, body_rotmats, betas)
        logger.warning("physics evaluation: row %d scored as invalid (worst values): %s", n, reason)
        worst = {name: math.inf for name in PHYSICS_METRIC_UNITS}
        worst.update(tracking_success=0.0, tracking_survival=0.0, tracking_graded=0.0, invalid=1.0)
        return worst

    def evaluate_one(self, T_world_root: Float[Tensor, "T 4 4"], body_rotmats: Float[Tensor, "T 21 3 3"],
                     betas: Float[Tensor, " 16"]) -> dict[str, float]:
        """The measures of one motion (see :meth:`evaluate`)."""
        humanoid = self.humanoids(betas)
        qpos = humanoid.qpos(T_world_root, body_rotmats)
        # one forward-kinematics pass (the inverse dynamics' own) for the plausibility and the tracker's reference
        data, tracker_data = self._scratch_data(humanoid)
        dyn = inverse_dynamics(humanoid, qpos, self.fps, self.cfg.inverse_dynamics, kinematics=True, data=data)
        kinematics = dyn.kinematics
        plaus = plausibility(humanoid, qpos, self.cfg.plausibility,
                             geom_poses=(kinematics.geom_xpos, kinematics.geom_xmat))
        weight = humanoid.weight_n
        out = {
            "residual_force_per_weight": float(dyn.residual_force_n.mean() / weight),
            "residual_torque_per_weight": float(dyn.residual_torque_nm.mean() / weight),
            "penetration_m": plaus.penetration_m,
            "floating_m": plaus.floating_m,
            "skating_m": plaus.skating_m,
            "invalid": 0.0,
        }
        if self.cfg.simulate:
            tr = track(humanoid, qpos, self.fps, self.cfg.tracking,
                       reference=(kinematics.joints, kinematics.foot_points), data=tracker_data)
            out.update(tracking_success=float(tr.success), tracking_survival=tr.survival, tracking_graded=tr.graded,
                       tracking_pelvis_rise_m=tr.pelvis_rise_m,
                       tracking_planted_foot_speed_m_per_s=tr.planted_foot_speed_m_per_s,
                       tracking_unexecuted_speed_m_per_s=tr.unexecuted_speed_m_per_s,
                       tracking_error_m=tr.tracking_error_m, tracking_residual_per_weight=tr.assist_n / weight,
                       tracking_residual_torque_per_weight=tr.assist_torque_nm / weight,
                       tracking_assist_per_weight=tr.assist_n / weight)
        else:
            out.update({k: float("nan") for k in PHYSICS_METRIC_UNITS if k.startswith("tracking_")})
        return out


def summarize(measures: Mapping[str, Tensor]) -> dict[str, float]:
    """Means over samples (NaN-aware) of :meth:`PhysicsEvaluator.evaluate`'s output; rows marked invalid are
    left out of every mean but ``invalid``'s own (the fraction of invalid rows), so one bad row does not make
    a mean infinite."""
    invalid = measures.get("invalid")

    def mean(name: str, values: Tensor) -> float:
        kept = values if name == "invalid" or invalid is None else values[invalid.to(values.device) == 0]
        return float(np.nanmean(kept.cpu().numpy())) if kept.numel() else float("nan")

    return {name: mean(name, values) for name, values in measures.items()}
