"""The ego-motion task as a :class:`diffgrpo.task.Task`: head trajectory in, full-body motion out.

Why an adapter: the GRPO core (rollouts, advantages, loss) knows nothing of bodies. This module
is the one place that says what the core's tensors mean here: which data a batch holds, which
part of it is the perturbable condition (the head *translation*, MotionGRPO section 8), how the
EgoAllo-style denoiser is called, and how a packed sample becomes a body in the world.

Frames, units and shapes (B windows, N = B x G samples, T motion frames, 30 fps, world +Z up,
metres, floor at z = 0):

- A batch is :meth:`~tasks.ego_motion.data.windows.EgoMotionWindows.get`'s dict: ``T_world_cpf``
  (B, T+1, 4, 4) headset poses; ground truth ``joints_world`` (B, T, 22, 3), ``body_rotmats``
  (B, T, 21, 3, 3), ``betas`` (B, 16), ``contacts`` (B, T, 21), ``T_world_root`` (B, T, 4, 4),
  ``hand_rotmats``, ``start_frame``, ``mirrored``. With ``post_train_heads_only`` a post_train
  batch holds ``T_world_cpf`` alone (ground-truth-free post-training).
- Frame alignment: a window holds T+1 head poses for T motion frames; motion frame t belongs to
  head pose t+1 (pose 0 only conditions frame 0 through the relative-pose features). Decoding
  therefore recovers the root of frame t from ``T_world_cpf[:, t + 1]``.
- A sample x0 is the packed motion (T, 226) of ``motion.py`` (betas | 21 rotations row-major |
  21 contacts), (T, 496) with hands.
- Timesteps are diffusers indices (999, 840, ..., 0, -1; ``motion.sampling_timesteps``), the
  numbering the prior was trained with (``prior.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler
from jaxtyping import Float
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import SamplerConfig
from diffgrpo.task import Batch
from tasks.ego_motion.body.body_model import BodyModel, load_body_model, pose_from_head
from tasks.ego_motion.body.geometry import FOOT_JOINTS, HEAD_JOINT, NUM_BETAS
from tasks.ego_motion.data.amass import TARGET_FPS
from tasks.ego_motion.data.sequences import WindowConfig
from tasks.ego_motion.data.splits import BUNDLED_CMU_DIR, BUNDLED_SPLIT_FILE, SPLITS, DataSource
from tasks.ego_motion.data.windows import EgoMotionWindows, load_windows
from tasks.ego_motion.evaluation import metrics
from tasks.ego_motion.model.condition import encode_head_trajectory
from tasks.ego_motion.model.motion import MotionSample, max_sampling_steps, motion_dim, sampling_timesteps
from tasks.ego_motion.model.prior import make_scheduler

logger = logging.getLogger(__name__)

DEMO_PRIOR_PATH = Path(__file__).resolve().parent / "assets" / "demo_prior.safetensors"
"""The shipped demo prior (``DenoiserConfig.demo()`` trained on the bundled CMU clips, 64-frame windows)."""
METRIC_UNITS: dict[str, str] = {
    "mpjpe_mm": "mm",
    "pa_mpjpe_mm": "mm",
    "mpjve_mm_per_s": "mm/s",
    "mpjre_deg": "deg",
    "jitter_m_per_s3": "m/s^3",
    "ground_penetration_m": "m",
    "foot_skating_m": "m",
    "head_position_error_mm": "mm",
    "head_orientation_error_deg": "deg",
}
"""Every key :meth:`EgoMotionTask.evaluate` returns, in table order, with its unit."""


@dataclass(frozen=True)
class EgoMotionTaskConfig:
    """Data, body model and sampler of the ego-motion task; every field is a CLI flag of the recipes."""

    window_frames: int = 64
    """T, motion frames per window (the demo prior uses 64; EgoAllo's reference 128)."""
    train_stride_frames: int | None = None
    """Frames between train window starts; None -> window_frames // 2."""
    test_stride_frames: int | None = None
    """Frames between test window starts; None -> window_frames (each test frame evaluated once)."""
    include_mirrored: bool = True
    """Add left/right mirrored copies of the train windows (never of the test windows)."""
    include_hands: bool = False
    """Generate the 30 hand rotations too (D = 496); must match the prior's DenoiserConfig."""
    data_root: Path = BUNDLED_CMU_DIR
    """Folder of AMASS-layout .npz files (default: the bundled CMU clips)."""
    split_rule: Literal["split_json", "egoallo"] = "split_json"
    """'split_json': clip names in split_file; 'egoallo': test = Transitions_mocap, SSM_synced."""
    split_file: Path | None = BUNDLED_SPLIT_FILE
    """JSON {"train": [...], "test": [...]} of clip names (split_rule='split_json' only)."""
    body_model_path: Path | None = None
    """SMPL-H .npz; None -> $DIFFGRPO_SMPLH_PATH or the bundled skeleton model."""
    cache_dir: Path | None = None
    """Window cache; None -> $DIFFGRPO_CACHE/ego_motion or ~/.cache/diffgrpo/ego_motion."""
    num_sampling_steps: int = 30
    """K network calls per sample: EgoAllo's quadratic grid (30 k / K)^2 for k = K..0, the first raised to the
    noisiest level (``motion.sampling_timesteps``); 1 <= K <= 42."""
    sampler_eta: float = 0.8
    """Scale of the single-step DDPM posterior std (EgoAllo's 0.8)."""
    use_egoallo_offset: bool = True
    """Keep the '+0.1' in the eps denominator sqrt(1 - abar_t + 0.1) of EgoAllo's released sampler."""
    log_prob_reduction: Literal["sum", "mean"] = "mean"
    """Per-step log-density over the T x D entries: 'mean' (GRPO default, size-independent) or 'sum'."""
    floor_contact_m: float | None = None
    """Keep only the windows whose lowest foot joint (ankles, toes) is within this many metres of z = 0 in at
    least ``floor_frame_fraction`` of their frames, in every split: the windows that stand on the world's floor,
    for rewards that assume it (the physics rewards). None: every window. The bundled data has captures on
    boxes and stairs."""
    floor_frame_fraction: float = 0.9
    """The fraction of a window's frames, in (0, 1], whose lowest foot joint must be within ``floor_contact_m``
    of z = 0 for the window to stay: at 0.9 brief flights (hops, jumps) stay, captures standing on a box or a
    step for longer do not. A value at or below 1 / T (e.g. 1e-6) keeps a window that is near the floor at
    any one frame, the filter before this option existed (commit 7fcf2a5)."""

    extra_post_train_dir: Path | None = None
    """A folder of AMASS-layout clips added to the post_train split (``windows.DataSource.extra_post_train_dir``),
    e.g. the ReActIdle idle clips (``python -m tasks.ego_motion.data.convert --reactidle``) as extra head
    trajectories."""
    post_train_heads_only: bool = False
    """Serve post_train windows as a headset gives them: the head trajectory ``T_world_cpf`` alone, no body.
    Ground-truth-free post-training: a reward or probe that reads the body fails naming the missing key, and
    the floor filter (``floor_contact_m``), which reads the feet, is not applied to post_train."""

    def __post_init__(self) -> None:
        if self.floor_contact_m is not None and not (math.isfinite(self.floor_contact_m) and self.floor_contact_m >= 0):
            raise ValueError(f"--task.floor-contact-m {self.floor_contact_m}: must be a finite number >= 0 (metres) "
                             "or unset.")
        if not 0 < self.floor_frame_fraction <= 1:
            raise ValueError(f"--task.floor-frame-fraction {self.floor_frame_fraction}: must be in (0, 1] (the "
                             "fraction of frames near the floor); pass 0.9 (the default) or 1e-6 for any one frame.")
        if self.window_frames < 4:
            raise ValueError(f"window_frames={self.window_frames}: jitter needs at least 4 frames per window; "
                             "pass --task.window-frames 32 or more.")
        if not 1 <= self.num_sampling_steps <= max_sampling_steps():
            raise ValueError(f"num_sampling_steps={self.num_sampling_steps} must be in [1, {max_sampling_steps()}] "
                             "(more steps repeat timesteps of the quadratic grid); EgoAllo uses 30.")
        if self.sampler_eta < 0:
            raise ValueError(f"sampler_eta={self.sampler_eta} must be >= 0 (0 = deterministic DDIM-like chain).")
        try:  # the eta range depends on the chain: build (and so check) the evaluation chain now
            self.sampling_chain()
        except ValueError as error:
            raise ValueError(f"--task.sampler-eta {self.sampler_eta}: {error}") from None

    def window_config(self) -> WindowConfig:
        return WindowConfig(window_frames=self.window_frames, train_stride_frames=self.train_stride_frames,
                            test_stride_frames=self.test_stride_frames, include_mirrored=self.include_mirrored)

    def data_source(self) -> DataSource:
        return DataSource(root=self.data_root, split_rule=self.split_rule, split_file=self.split_file,
                          extra_post_train_dir=self.extra_post_train_dir)

    def sampler_config(self) -> SamplerConfig:
        """EgoAllo's step (method 'egoallo') with this config's eta and '+0.1' offset."""
        return SamplerConfig(method="egoallo", eta=self.sampler_eta, log_prob_reduction=self.log_prob_reduction,
                             egoallo_denominator_offset=0.1 if self.use_egoallo_offset else 0.0)

    def sampling_chain(self, num_steps: int | None = None, *, sde_window: tuple[int, int] | None = None,
                       noise_frequencies: int | None = None,
                       noise_features: tuple[int, int] | None = None) -> SamplingChain:
        """The task's sampling chain with K = ``num_steps`` (None: ``num_sampling_steps``, the evaluation
        chain): the prior's scheduler, EgoAllo's grid resampled to K (``motion.sampling_timesteps``) and
        :meth:`sampler_config`, optionally restricted to an SDE window and an exploration subspace
        (``SamplerConfig.sde_window`` / ``noise_frequencies`` / ``noise_features``).

        Built and checked once per distinct chain in a process (memoised): the evaluation chain, the
        shorter rollout chain of MotionGRPO, and the probe all reuse it. Raises ValueError naming
        ``--task.sampler-eta`` when a step is undefined for the eta."""
        num_steps = self.num_sampling_steps if num_steps is None else num_steps
        if not 1 <= num_steps <= max_sampling_steps():
            raise ValueError(f"a chain of K={num_steps} steps: K must be in [1, {max_sampling_steps()}] (more steps "
                             "repeat timesteps of the quadratic grid); EgoAllo uses 30.")
        sampler = dataclasses.replace(self.sampler_config(), sde_window=sde_window,
                                      noise_frequencies=noise_frequencies, noise_features=noise_features)
        return _chain(num_steps, sampler, (self.window_frames, motion_dim(self.include_hands)))


@functools.cache
def _chain(num_steps: int, sampler: SamplerConfig, sample_shape: tuple[int, int]) -> SamplingChain:
    """One checked chain per (K, sampler, sample shape): the prior's scheduler and EgoAllo's grid."""
    scheduler = make_scheduler()
    if scheduler.config.prediction_type != "sample":
        raise ValueError(f"prior.make_scheduler() predicts {scheduler.config.prediction_type!r}; the ego-motion "
                         "denoiser predicts x0, so the scheduler needs prediction_type='sample'.")
    return SamplingChain.build(scheduler, sampling_timesteps(num_steps, convention="diffusers"), sampler,
                               sample_shape, eta_flag="--task.sampler-eta")


class EgoMotionTask:
    """Implements :class:`diffgrpo.task.Task` for egocentric body recovery (see the module docstring).

    ``body`` may be passed to share one loaded body model; windows are loaded (or built and
    cached) on first use of a split.
    """

    def __init__(self, cfg: EgoMotionTaskConfig | None = None, *, body: BodyModel | None = None) -> None:
        self.cfg = cfg or EgoMotionTaskConfig()
        self.body = body if body is not None else load_body_model(self.cfg.body_model_path)
        if self.body.num_betas < NUM_BETAS:
            raise ValueError(f"body model {self.body.source} has {self.body.num_betas} betas but the prior predicts "
                             f"{NUM_BETAS}; use an SMPL-H file with 16 shape coefficients (--task.body-model-path).")
        self.sample_shape: tuple[int, ...] = (self.cfg.window_frames, motion_dim(self.cfg.include_hands))
        self.fps = TARGET_FPS
        self._windows: dict[str, EgoMotionWindows] = {}
        self._kept: dict[str, Tensor] = {}

    # -- diffusion ---------------------------------------------------------------------------------
    def make_scheduler(self) -> DDPMScheduler:
        """The prior's cosine DDPM schedule with x0-prediction (``prior.make_scheduler``)."""
        scheduler = make_scheduler()
        if scheduler.config.prediction_type != "sample":
            raise ValueError(f"prior.make_scheduler() predicts {scheduler.config.prediction_type!r}; the ego-motion "
                             "denoiser predicts x0, so the scheduler needs prediction_type='sample'.")
        return scheduler

    def sampling_timesteps(self) -> Tensor:
        """(K+1,) diffusers indices 999, 840, 783, ..., 3, 0, -1: EgoAllo's k^2 schedule minus one.

        The last step (0 -> -1, into abar = 1) is deterministic and carries no log-probability.
        """
        return sampling_timesteps(self.cfg.num_sampling_steps, convention="diffusers")

    def sampler_config(self) -> SamplerConfig:
        return self.cfg.sampler_config()

    def sampling_chain(self, num_steps: int | None = None, **restrictions) -> SamplingChain:
        """The chain of K = ``num_steps`` steps (None: the evaluation chain's); see
        :meth:`EgoMotionTaskConfig.sampling_chain`."""
        return self.cfg.sampling_chain(num_steps, **restrictions)

    # -- data --------------------------------------------------------------------------------------
    def windows(self, split: str) -> EgoMotionWindows:
        """The cached windows of ``split`` (``windows.SPLITS``; training splits include mirrored copies, test not)."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; the ego-motion task has {SPLITS}.")
        if split not in self._windows:
            self._windows[split] = load_windows(split, source=self.cfg.data_source(),  # type: ignore[arg-type]
                                                config=self.cfg.window_config(),
                                                body_model_path=self.cfg.body_model_path,
                                                cache_dir=self.cfg.cache_dir)
        return self._windows[split]

    def kept_windows(self, split: str) -> Tensor:
        """(n,) indices into ``windows(split)`` of the windows this task serves (``cfg.floor_contact_m``)."""
        if split not in self._kept:
            windows = self.windows(split)
            everything = torch.arange(len(windows))
            if self.cfg.floor_contact_m is None or self.is_heads_only(split):
                if self.cfg.floor_contact_m is not None:  # said once per split: the filter reads the feet
                    logger.warning("--task.floor-contact-m %s is not applied to the heads-only %s split (the filter "
                                   "reads the feet); its %d windows all stay, including any not on the floor z = 0.",
                                   self.cfg.floor_contact_m, split, len(windows))
                self._kept[split] = everything
            else:
                feet_z = windows.get(everything)["joints_world"][:, :, list(FOOT_JOINTS), 2]
                on_floor = (feet_z.amin(dim=2) <= self.cfg.floor_contact_m).double().mean(dim=1)  # (N,) of frames
                self._kept[split] = torch.nonzero(on_floor >= self.cfg.floor_frame_fraction).flatten()
                if len(self._kept[split]) == 0:
                    raise ValueError(f"no {split} window stays within --task.floor-contact-m "
                                     f"{self.cfg.floor_contact_m} of the floor z = 0; raise it or unset it.")
        return self._kept[split]

    def num_examples(self, split: str) -> int:
        return len(self.kept_windows(split))

    def is_heads_only(self, split: str) -> bool:
        """Whether ``split``'s examples carry the head trajectory alone (``cfg.post_train_heads_only``)."""
        return split == "post_train" and self.cfg.post_train_heads_only

    def load_examples(self, split: str, indices: Tensor) -> Batch:
        """Windows at ``indices`` (B,) of ``split`` (positions among ``kept_windows``); keys and shapes in the
        module docstring."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D (B,), got shape {tuple(indices.shape)}.")
        examples = self.windows(split).get(self.kept_windows(split)[indices])
        return {"T_world_cpf": examples["T_world_cpf"]} if self.is_heads_only(split) else examples

    def raw_condition(self, batch: Batch) -> Float[Tensor, "B Tp1 3"]:
        """Head (CPF) translations ``T_world_cpf[..., :3, 3]`` (B, T+1, 3), world metres.

        Why translation only: MotionGRPO perturbs the head position and keeps its orientation.
        """
        return batch["T_world_cpf"][..., :3, 3]

    def with_raw_condition(self, batch: Batch, raw: Float[Tensor, "B Tp1 3"]) -> Batch:
        """A copy of ``batch`` whose head translations are ``raw``; head rotations and targets unchanged."""
        T_world_cpf = batch["T_world_cpf"]
        if raw.shape != T_world_cpf.shape[:-2] + (3,):
            raise ValueError(f"raw condition has shape {tuple(raw.shape)}, expected "
                             f"{tuple(T_world_cpf.shape[:-2]) + (3,)} (B, T+1, 3) head translations; "
                             "perturbers must keep the shape.")
        perturbed = T_world_cpf.clone()
        perturbed[..., :3, 3] = raw.to(perturbed.dtype)
        return {**batch, "T_world_cpf": perturbed}

    def encode_condition(self, batch: Batch) -> Float[Tensor, "B T 154"]:
        """g(head trajectory) per motion frame (``condition.encode_head_trajectory``)."""
        return encode_head_trajectory(batch["T_world_cpf"])

    # -- network -----------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Float[Tensor, "N T D"]:
        """The denoiser's x0 estimate (prediction_type 'sample') for x_t (N, T, D) at diffusers t (N,)."""
        if x_t.ndim != 3 or x_t.shape[-1] != self.sample_shape[-1] or cond.shape[:2] != x_t.shape[:2]:
            raise ValueError(f"predict got x_t {tuple(x_t.shape)} and cond {tuple(cond.shape)}; expected "
                             f"(N, T, {self.sample_shape[-1]}) and (N, T, 154) with the same N and T.")
        return model(x_t, t, cond.to(x_t.dtype))

    # -- outputs -----------------------------------------------------------------------------------
    def decode(self, x0: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Bodies of final samples x0 (N, T, D) on the batch's (possibly perturbed) head; see :func:`decode_motion`."""
        return decode_motion(self.body, x0, batch["T_world_cpf"], include_hands=self.cfg.include_hands)

    def decode_x0(self, x0: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Any x0 with extra axes, e.g. a trajectory's per-step predictions ``traj.x0_preds[:, -3:]``
        (N, K, T, D) -> joints (N, K, T, 22, 3); every output gains the same (N, K) axes."""
        return decode_motion(self.body, x0, batch["T_world_cpf"], include_hands=self.cfg.include_hands)

    def evaluate(self, decoded: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Every metric of ``metrics.py`` per sample (N,) against the batch's ground truth (keys: METRIC_UNITS).

        Head errors compare the predicted head joint (FK of the decoded body) with the ground-truth
        head joint, and its world rotation with the CPF rotation (the CPF offset has no rotation).
        On an unperturbed head they measure the consistency of the root recovery (~0 for the
        bundled skeleton, whose CPF offset does not depend on betas); on a perturbed head they
        include the perturbation.
        """
        pred, gt = decoded["joints_world"], batch["joints_world"].to(decoded["joints_world"])
        gt_R_head = batch["T_world_cpf"][:, 1:, :3, :3].to(pred)
        out = {
            "mpjpe_mm": metrics.mpjpe(pred, gt),
            "pa_mpjpe_mm": metrics.pa_mpjpe(pred, gt),
            "mpjve_mm_per_s": metrics.mpjve(pred, gt, self.fps),
            "mpjre_deg": metrics.mpjre(decoded["body_rotmats"], batch["body_rotmats"].to(pred)),
            **plausibility_metrics(pred, self.fps),
            "head_position_error_mm": metrics.head_position_error(pred[:, :, HEAD_JOINT], gt[:, :, HEAD_JOINT]),
            "head_orientation_error_deg": metrics.head_orientation_error(decoded["T_world_head"][..., :3, :3],
                                                                         gt_R_head),
        }
        return {name: out[name] for name in METRIC_UNITS}


def plausibility_metrics(joints_world: Float[Tensor, "B T 22 3"], fps: float = TARGET_FPS) -> dict[str, Tensor]:
    """Jitter (m/s^3), ground penetration (m) and foot skating (m, summed over the T frames) per sequence (B,).

    Why separate: they need no ground truth, so the same numbers can be reported for the ground
    truth itself, the floor any prediction is compared with.
    """
    return {
        "jitter_m_per_s3": metrics.jitter(joints_world, fps),
        "ground_penetration_m": metrics.ground_penetration(joints_world),
        "foot_skating_m": metrics.foot_skating(joints_world),
    }


def decode_motion(
    body: BodyModel,
    x0: Float[Tensor, "B *K T D"],
    T_world_cpf: Float[Tensor, "B Tp1 4 4"],
    *,
    include_hands: bool = False,
) -> dict[str, Tensor]:
    """Packed samples -> bodies in the world, with the root recovered from the given head poses.

    Steps: unpack with SVD projection of the rotations onto SO(3) and contacts clamped to [0, 1];
    betas = per-sequence mean of the per-frame predictions; head pose of motion frame t =
    ``T_world_cpf[:, t + 1]`` (pass the *perturbed* head when the condition was perturbed: the
    body must hang from the head the model saw); root from head; forward kinematics.

    Args:
        x0: (B, T, D) samples, or (B, K, T, D) with extra axes after the first (e.g. the x0
            predictions of K sampling steps); D = 226 (496 with hands).
        T_world_cpf: (B, T+1, 4, 4) the window's head poses, shared by all extra axes.

    Returns (lead = the axes of x0 before T): ``joints_world`` (*lead, T, 22, 3) m,
    ``body_rotmats`` (*lead, T, 21, 3, 3), ``contacts`` (*lead, T, 21) in [0, 1], ``betas`` (*lead, 16),
    ``betas_per_frame`` (*lead, T, 16), ``T_world_root``, ``T_world_head`` and ``T_world_cpf``
    (*lead, T, 4, 4) (the head poses used), and ``hand_rotmats`` (*lead, T, 30, 3, 3) with hands.
    """
    if x0.ndim < 3:
        raise ValueError(f"x0 has shape {tuple(x0.shape)}; expected (B, T, D) or (B, K, T, D).")
    lead, T = x0.shape[:-2], x0.shape[-2]
    if T_world_cpf.ndim != 4 or T_world_cpf.shape[0] != lead[0] or T_world_cpf.shape[1] != T + 1:
        raise ValueError(f"T_world_cpf has shape {tuple(T_world_cpf.shape)}, expected ({lead[0]}, {T + 1}, 4, 4): "
                         "the T+1 head poses of the window the samples belong to.")
    motion = MotionSample.unpack(x0, include_hands=include_hands, project_rotations=True, clamp_contacts=True)
    betas = motion.betas.mean(dim=-2)  # (*lead, 16)
    model_betas = torch.nn.functional.pad(betas, (0, body.num_betas - NUM_BETAS))
    head = T_world_cpf[:, 1:].to(x0.dtype)  # (B, T, 4, 4): motion frame t <-> head pose t + 1
    head = head.reshape(lead[0], *(1,) * (len(lead) - 1), T, 4, 4).expand(*lead, T, 4, 4)
    out = pose_from_head(body, head, motion.body_rotmats, model_betas, motion.hand_rotmats)
    out.update(body_rotmats=motion.body_rotmats, contacts=motion.contacts, betas=betas,
               betas_per_frame=motion.betas, T_world_cpf=head)
    if motion.hand_rotmats is not None:
        out["hand_rotmats"] = motion.hand_rotmats
    return out
