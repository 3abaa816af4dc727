"""Training loss, noise schedule and a quick held-out check of the EgoAllo-style motion prior.

Why one module: the pretraining recipe (``recipes/pretrain_ego_motion.py``) and the GRPO recipe
must agree on the noise schedule, on how a data window becomes the packed target x0, and on the
timestep fed to the network; each of those lives here once (docs/ego_motion_prior.md).

Timestep convention: the network receives the *diffusers* index i in 0..999 of
``scheduler.alphas_cumprod`` (EgoAllo's t = i + 1, see ``motion.py``). Training draws i uniformly
and noises with ``scheduler.add_noise``; sampling walks ``motion.sampling_timesteps(
convention="diffusers")`` (999, 840, ..., 0, -1), so both feed the network the same numbering.

Shapes: B windows, T frames, D packed motion size (226, or 496 with hands), C = 154 condition
features. Symbols: x0 clean motion, x_t noisy motion, abar_t = alphas_cumprod[t].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from jaxtyping import Float, Int
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import SamplerConfig
from diffgrpo.rollout import rollout
from tasks.ego_motion.body.body_model import BodyModel, pose_from_head
from tasks.ego_motion.body.geometry import project_to_so3
from tasks.ego_motion.evaluation import metrics
from tasks.ego_motion.model.condition import encode_head_trajectory
from tasks.ego_motion.model.motion import (
    MotionSample,
    loss_weights,
    modality_slices,
    motion_dim,
    sampling_timesteps,
    timestep_loss_weights,
)

NUM_TRAIN_TIMESTEPS = 1000
LOSS_TERMS: tuple[str, ...] = ("betas", "body_rotmats", "contacts", "hand_rotmats")
"""Names of the per-modality loss terms, in packing order (``hand_rotmats`` only with hands)."""


def make_scheduler() -> DDPMScheduler:
    """The cosine schedule of docs/ego_motion_prior.md (s = 0.008, 1000 steps, betas capped at 0.999), x0-prediction.

    Why diffusers: ``squaredcos_cap_v2`` is exactly that schedule, and ``diffgrpo.sde`` reads its
    ``alphas_cumprod`` table; ``clip_sample=False`` because rotation entries and betas are not in [-1, 1].
    """
    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="squaredcos_cap_v2",
                         prediction_type="sample", clip_sample=False)


def batch_to_motion(batch: dict[str, Tensor], include_hands: bool = False) -> Float[Tensor, "B T D"]:
    """Pack a batch of :func:`~tasks.ego_motion.data.windows.load_windows` windows into the target x0.

    betas (B, 16) are repeated for each of the T frames (the network predicts them per frame);
    body_rotmats (B, T, 21, 3, 3), contacts (B, T, 21) and, with hands, hand_rotmats (B, T, 30, 3, 3).
    """
    missing = [k for k in ("betas", "body_rotmats", "contacts") if k not in batch]
    if include_hands and "hand_rotmats" not in batch:
        missing.append("hand_rotmats")
    if missing:
        raise KeyError(f"batch lacks {missing}; pass the dict returned by EgoMotionWindows.get(indices).")
    body = batch["body_rotmats"]  # (B, T, 21, 3, 3)
    betas = batch["betas"][..., None, :].expand(*body.shape[:-3], batch["betas"].shape[-1])  # (B, T, 16)
    sample = MotionSample(betas=betas, body_rotmats=body, contacts=batch["contacts"],
                          hand_rotmats=batch["hand_rotmats"] if include_hands else None)
    return sample.pack()  # (B, T, D)


@dataclass(frozen=True)
class DiffusionLoss:
    """What :func:`diffusion_loss` returns: the scalar to minimise and its detached parts."""

    loss: Float[Tensor, ""]
    """Sum of the per-modality terms (with gradient)."""
    terms: dict[str, Tensor]
    """Detached scalar of each modality's weighted term (keys from ``LOSS_TERMS``); they sum to ``loss``."""
    timesteps: Int[Tensor, " B"]
    """The diffusers timestep index drawn (or given) for each window."""


def diffusion_loss(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    scheduler: DDPMScheduler,
    batch: dict[str, Tensor],
    generator: torch.Generator | None,
    *,
    include_hands: bool = False,
    timesteps: Int[Tensor, " B"] | None = None,
    noise: Float[Tensor, "B T D"] | None = None,
) -> DiffusionLoss:
    """The x0-regression loss of docs/ego_motion_prior.md on one batch of windows.

    Why x0 and these weights: the sampler needs x0_hat, and rotations matter most. Equation, with
    w_t = ``timestep_loss_weights`` (0.99 snr_t / snr_1 + 0.01) and w_d = ``loss_weights`` (betas
    0.1 / (i + 1), rotations 1, contacts 0.1, hands 0.01)::

        t ~ U{0, ..., 999},  eps ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        term_m = mean_{b, frame, d in m} [ w_{t_b} w_d (model(x_t, t, g(head))_d - x0_d)^2 ]
        loss = sum_m term_m          (m over betas, body rotations, contacts[, hands])

    Each modality's squared error is averaged over its own dimensions (an MSE per term, as in
    EgoAllo), so the 189 rotation entries do not drown the 21 contacts by count alone.

    ``timesteps`` (B,) and ``noise`` (B, T, D) fix the draw (tests, ablations); otherwise both
    come from ``generator`` (a CPU generator: identical draws on any device). The condition is
    ``encode_head_trajectory(batch["T_world_cpf"])``. Computed in float32 whatever the autocast.
    """
    x0 = batch_to_motion(batch, include_hands).float()  # (B, T, D)
    B = x0.shape[0]
    cond = encode_head_trajectory(batch["T_world_cpf"].float())  # (B, T, 154)
    num_train = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps = torch.randint(0, num_train, (B,), generator=generator)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator)
    if timesteps.shape != (B,) or not bool(((timesteps >= 0) & (timesteps < num_train)).all()):
        raise ValueError(f"timesteps must be ({B},) integers in [0, {num_train}), got shape "
                         f"{tuple(timesteps.shape)} and values {timesteps.tolist()[:8]}.")
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)} like the packed motion.")
    timesteps = timesteps.to(x0.device)
    x_t = scheduler.add_noise(x0, noise.to(x0), timesteps)  # (B, T, D)
    x0_hat = model(x_t, timesteps, cond).float()  # (B, T, D)

    w_t = timestep_loss_weights(scheduler.alphas_cumprod.to(x0.device, torch.float64))[timesteps].float()  # (B,)
    w_d = loss_weights(include_hands).to(x0.device)  # (D,)
    sq_err = (x0_hat - x0).square() * w_d * w_t[:, None, None]  # (B, T, D)
    terms = {name: sq_err[..., s].mean() for name, s in modality_slices(include_hands).items()}
    loss = torch.stack(list(terms.values())).sum()
    return DiffusionLoss(loss=loss, terms={k: v.detach() for k, v in terms.items()}, timesteps=timesteps)


# ---------------------------------------------------------------------------------------------
# Quick held-out check: sample, recover the root from the head, compare joints


@torch.no_grad()
def sample_prior(
    model: nn.Module,
    scheduler: DDPMScheduler,
    T_world_cpf: Float[Tensor, "B Tp1 4 4"],
    generator: torch.Generator,
    *,
    include_hands: bool = False,
    num_steps: int = 30,
    eta: float = 0.8,
) -> MotionSample:
    """Draw one motion per head trajectory with EgoAllo's sampler, decoded onto SO(3) and [0, 1].

    The chain is ``diffgrpo.rollout`` with method 'egoallo' over ``sampling_timesteps(num_steps,
    convention='diffusers')``; betas are averaged over the window's frames (they are constant in
    truth). Noise comes from ``generator`` (CPU).
    """
    cond = encode_head_trajectory(T_world_cpf.float())  # (B, T, 154)
    B, T = cond.shape[:2]
    timesteps = sampling_timesteps(num_steps, scheduler.config.num_train_timesteps, convention="diffusers")
    chain = SamplingChain.build(scheduler, timesteps, SamplerConfig(method="egoallo", eta=eta),
                                (T, motion_dim(include_hands)))
    traj = rollout(lambda x, t, c: model(x, t, c), chain, cond, torch.arange(B), generator=generator)
    sample = MotionSample.unpack(traj.samples.float(), include_hands=include_hands, project_rotations=True,
                                 clamp_contacts=True)
    betas = sample.betas.mean(dim=1, keepdim=True).expand_as(sample.betas)
    return MotionSample(betas=betas, body_rotmats=sample.body_rotmats, contacts=sample.contacts,
                        hand_rotmats=sample.hand_rotmats)


def mean_pose(windows_batch: dict[str, Tensor]) -> tuple[Float[Tensor, "21 3 3"], Float[Tensor, " 16"]]:
    """The trivial baseline's pose: chordal mean of each joint's rotation (projected onto SO(3)) and mean betas."""
    rot = project_to_so3(windows_batch["body_rotmats"].float().mean(dim=(0, 1)))  # (21, 3, 3)
    return rot, windows_batch["betas"].float().mean(dim=0)


def joint_errors(pred: Float[Tensor, "B T 22 3"], pred_rotmats: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-window MPJPE and PA-MPJPE (mm) and MPJRE (degrees) against the batch's ground truth."""
    gt = batch["joints_world"].float()
    return {"mpjpe_mm": metrics.mpjpe(pred, gt), "pa_mpjpe_mm": metrics.pa_mpjpe(pred, gt),
            "mpjre_deg": metrics.mpjre(pred_rotmats, batch["body_rotmats"].float())}


def evaluate_prior(
    model: nn.Module,
    scheduler: DDPMScheduler,
    body_model: BodyModel,
    batch: dict[str, Tensor],
    baseline_pose: tuple[Tensor, Tensor],
    generator: torch.Generator,
    *,
    include_hands: bool = False,
    num_steps: int = 30,
    eta: float = 0.8,
) -> dict[str, Tensor]:
    """Held-out quick check: per-window errors of one prior sample and of the mean-pose baseline.

    Keys ``prior/<metric>`` and ``baseline/<metric>`` (see :func:`joint_errors`), each (B,). The
    baseline stands still in ``baseline_pose`` (from :func:`mean_pose` of training windows) with
    its root recovered from the same head trajectory, so it already gets the head right.
    """
    T_world_cpf = batch["T_world_cpf"].float()
    B, T = T_world_cpf.shape[0], T_world_cpf.shape[1] - 1
    sample = sample_prior(model, scheduler, T_world_cpf, generator, include_hands=include_hands,
                          num_steps=num_steps, eta=eta)
    head = T_world_cpf[:, 1:]  # motion frame t <-> head pose t + 1
    pred = pose_from_head(body_model, head, sample.body_rotmats, sample.betas[:, 0])["joints_world"]
    rot, betas = baseline_pose
    rot_b = rot.expand(B, T, *rot.shape)
    base = pose_from_head(body_model, head, rot_b, betas.expand(B, -1))["joints_world"]
    out = {f"prior/{k}": v for k, v in joint_errors(pred, sample.body_rotmats, batch).items()}
    out.update({f"baseline/{k}": v for k, v in joint_errors(base, rot_b, batch).items()})
    return out
