"""What the perceptual model (``perceptual.py``) learns from: positives, negatives and its warm-up.

The perceptual model is trained with InfoNCE: each condition's ground truth under its own head must score
above M negatives. Which negatives it sees decides what it learns to tell apart:

- ``x0_last`` (MotionGRPO, docs/ego_motion_rewards.md): the first group member's x0 predictions at the
  last 3 sampling steps, the policy's own near-final errors. Three near-copies of one chain.
- ``members``: the other G-1 members' final samples, the bodies the reward will score next.
- ``foreign``: another condition's ground truth moved rigidly under this head
  (:func:`transplant`): a real motion that does not follow this head, so only the head's motion
  over time gives it away (the alignment contrast).

Which head a policy negative is scored on: with per-member condition perturbation each sample
was generated for, and is rewarded on, its own perturbed head. ``on_own_head=True`` decodes and
scores the negatives there, as the reward does; False decodes them on the clean head, as
MotionGRPO's perceptual model does (they then differ from the truth only by the policy's errors).

A warm-up (:func:`warm_up_perceptual`) trains the perceptual model on the prior's samples before GRPO starts,
so the first iterations' perceptual reward is not a random network's. RLPF (arXiv 2506.12769) freezes
the perceptual model after it as the alignment guard; MotionGRPO's recipe keeps training it online.

Shapes: B conditions, G group members, M negatives per condition, T frames, J = 22 joints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.modes import evaluation_mode
from diffgrpo.rng import make_generator
from diffgrpo.task import Batch, batch_to, select_rows
from diffgrpo.train_step import RolloutBatch
from tasks.ego_motion.body.geometry import invert_transform, make_transform, rotation_about_z
from tasks.ego_motion.rewards.perceptual import PerceptualTrainer
from tasks.ego_motion.sampling.sampler import sample_motion
from tasks.ego_motion.task import EgoMotionTask

NegativeKind = Literal["x0_last", "members", "foreign"]
NEGATIVE_KINDS: tuple[NegativeKind, ...] = ("x0_last", "members", "foreign")
NUM_X0_LAST = 3
"""x0_last negatives per condition: the last 3 sampling steps' x0 predictions (docs/ego_motion_rewards.md)."""


def yaw_free_head_frame(T_world_cpf: Float[Tensor, "N 4 4"]) -> Float[Tensor, "N 4 4"]:
    """The head's ground frame: rotation Rz(psi) (psi = yaw of the CPF's forward axis, local +Z) and
    translation (x, y, 0) of the CPF; world metres, +Z up."""
    forward = T_world_cpf[..., :3, 2]
    ground = torch.nn.functional.pad(T_world_cpf[..., :2, 3], (0, 1))  # (x, y, 0)
    return make_transform(rotation_about_z(torch.atan2(forward[..., 1], forward[..., 0])), ground)


def transplant(joints: Float[Tensor, "N T J 3"], from_T_world_cpf: Float[Tensor, "N 4 4"],
               to_T_world_cpf: Float[Tensor, "N 4 4"]) -> Float[Tensor, "N T J 3"]:
    """Move whole motions rigidly (yaw about +Z and a horizontal shift) so that the head frame
    ``from_T_world_cpf`` lands on ``to_T_world_cpf``'s ground frame (:func:`yaw_free_head_frame`).

    Why: a real motion placed under another window's head starts where that head is and faces its
    way, but does not follow that head's trajectory: a negative that only the head's motion over
    time gives away.
    """
    T_to_from = yaw_free_head_frame(to_T_world_cpf) @ invert_transform(yaw_free_head_frame(from_T_world_cpf))
    R, t = T_to_from[:, None, None, :3, :3], T_to_from[:, None, None, :3, 3]
    return (R @ joints[..., None])[..., 0] + t


def foreign_truths(joints: Float[Tensor, "B T J 3"], T_world_cpf: Float[Tensor, "B T+1 4 4"],
                   other: Tensor) -> Float[Tensor, "B T J 3"]:
    """Window ``other[b]``'s ground truth transplanted under window b's first target-frame head.

    Raises:
        ValueError: some ``other[b] == b`` (a window is no negative of itself).
    """
    if bool((other == torch.arange(len(other), device=other.device)).any()):
        raise ValueError("foreign_truths: other[b] == b for some b; a window's own truth is its positive.")
    return transplant(joints[other], T_world_cpf[other, 1], T_world_cpf[:, 1])


def rollout_negatives(task: EgoMotionTask, data: RolloutBatch, batch: Batch, group_size: int,
                      kinds: Sequence[NegativeKind], on_own_head: bool
                      ) -> tuple[Float[Tensor, "B M T J 3"], Float[Tensor, "B M T+1 4 4"]]:
    """This iteration's negatives for each of the B conditions, and the head each is scored on.

    ``data``: the iteration's rollouts (B x G chains, members of a group adjacent, heads perturbed
    per member or not); ``batch``: the B clean conditions with their ground truth. M = 3 per
    ``x0_last``, G-1 per ``members``, 1 per ``foreign``, always in that order (x0_last, members,
    foreign) whatever the order of ``kinds``.

    Raises:
        ValueError: an unknown kind, no kind, ``foreign`` with fewer than 2 conditions, or rollouts
            that are not B x G chains.
    """
    unknown = [k for k in kinds if k not in NEGATIVE_KINDS]
    if unknown or not kinds:
        raise ValueError(f"negative kinds {list(kinds)}: unknown or none ({unknown}); choose from {NEGATIVE_KINDS}.")
    clean = batch["T_world_cpf"]  # (B, T+1, 4, 4)
    B, G = clean.shape[0], group_size
    if data.batch["T_world_cpf"].shape[0] != B * G:
        raise ValueError(f"the rollouts hold {data.batch['T_world_cpf'].shape[0]} chains, not B x G = {B} x {G}; pass "
                         "the iteration's batch of B conditions and --grpo.group-size G.")
    member_heads = data.batch["T_world_cpf"].reshape(B, G, *clean.shape[1:])  # as each chain was conditioned
    joints, heads = [], []
    if "x0_last" in kinds:
        first = torch.arange(0, B * G, G, device=clean.device)
        source = select_rows(data.batch, first) if on_own_head else batch
        joints.append(task.decode_x0(data.trajectory.x0_preds[first, -NUM_X0_LAST:], source)["joints_world"])
        head = member_heads[:, 0] if on_own_head else clean
        heads.append(head[:, None].expand(B, NUM_X0_LAST, *clean.shape[1:]))
    if "members" in kinds and G > 1:
        if on_own_head:  # exactly the bodies the rewards scored
            decoded = data.decoded["joints_world"]
            joints.append(decoded.reshape(B, G, *decoded.shape[1:])[:, 1:])
            heads.append(member_heads[:, 1:])
        else:
            x0 = data.trajectory.states[:, -1]  # (B*G, T, D) final samples
            joints.append(task.decode_x0(x0.reshape(B, G, *x0.shape[1:])[:, 1:], batch)["joints_world"])
            heads.append(clean[:, None].expand(B, G - 1, *clean.shape[1:]))
    if "foreign" in kinds:
        if B < 2:
            raise ValueError("'foreign' negatives need at least 2 conditions per iteration and process; raise "
                             "--grpo.conditions-per-iteration or drop 'foreign'.")
        joints.append(foreign_truths(batch["joints_world"], clean, next_other_window(batch["joints_world"]))[:, None])
        heads.append(clean[:, None])
    return torch.cat(joints, dim=1), torch.cat(heads, dim=1)


def next_other_window(joints: Float[Tensor, "B T J 3"]) -> Tensor:
    """(B,) for each row b the next row (cyclically) holding another motion than row b.

    Why not simply b + 1: a batch may hold one window twice (a draw crossing an epoch boundary), and
    a foreign negative equal to its positive would ask the perceptual model to score one motion above itself.

    Raises:
        ValueError: every row holds the same motion.
    """
    B = joints.shape[0]
    other = torch.empty(B, dtype=torch.long, device=joints.device)
    for b in range(B):
        candidates = [(b + k) % B for k in range(1, B) if not torch.equal(joints[(b + k) % B], joints[b])]
        if not candidates:
            raise ValueError("'foreign' negatives need two different windows in the batch; every row holds the same "
                             "motion.")
        other[b] = candidates[0]
    return other


def group_correlations(score: Float[Tensor, " N"], value: Float[Tensor, " N"], group_size: int) -> Tensor:
    """(N / group_size,) Pearson correlation of ``score`` and ``value`` across each group's members
    (rows of a group adjacent); NaN where either has no spread. Does a learned reward rank a group's
    samples as another measure (an accuracy reward, -MPJPE) does?"""
    a, b = (x.double().view(-1, group_size) for x in (score, value))
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.square().sum(dim=1) * b.square().sum(dim=1)).sqrt()


@torch.no_grad()
def prior_joints(task: EgoMotionTask, model: nn.Module, windows: Batch, seed: int, stream: str,
                 chunk_size: int = 32, *, chain: SamplingChain | None = None) -> Float[Tensor, "W T J 3"]:
    """One sample of ``model`` per window on ``chain`` (default: the task's evaluation chain), decoded to
    world joints (metres).

    Window w draws its noise from ``make_generator(seed, stream, first window of its chunk)``: the
    same windows, seed and stream give the same bodies. Sampled on the model's device (in eval
    mode, restored after); returned on the windows' device.
    """
    device = next(model.parameters()).device
    out = []
    with evaluation_mode(model):
        for idx in torch.arange(len(windows["T_world_cpf"])).split(chunk_size):
            batch = batch_to(select_rows(windows, idx), device)
            trajectory = sample_motion(task, model, batch, group_ids=idx.to(device), chain=chain,
                                       generator=make_generator(seed, stream, int(idx[0]), device=device))
            out.append(task.decode(trajectory.samples, batch)["joints_world"].to(windows["T_world_cpf"].device))
    return torch.cat(out)


def warm_up_perceptual(
    trainer: PerceptualTrainer,
    joints: Float[Tensor, "W T J 3"],
    T_world_cpf: Float[Tensor, "W T+1 4 4"],
    prior_joints: Float[Tensor, "W T J 3"],
    *,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> list[dict[str, float]]:
    """Train ``trainer`` for ``steps`` InfoNCE steps on W windows before GRPO starts.

    Positives: the windows' ground truth under their own heads. Negatives per window (M = 2): the
    prior's sample for that head (``prior_joints``, the realism contrast of MotionGRPO's perceptual model)
    and another window's ground truth transplanted under this head (the alignment contrast).
    Batches of ``batch_size`` windows drawn with ``generator``. Returns each step's statistics
    (``PerceptualTrainer.train_step``'s dict).

    Raises:
        ValueError: shapes disagree, fewer than 2 windows, or non-positive steps / batch size.
    """
    W = joints.shape[0]
    if prior_joints.shape != joints.shape or T_world_cpf.shape[:2] != (W, joints.shape[1] + 1):
        raise ValueError(f"joints {tuple(joints.shape)}, prior_joints {tuple(prior_joints.shape)} and T_world_cpf "
                         f"{tuple(T_world_cpf.shape)} must describe the same W windows of T frames (T+1 head poses).")
    if W < 2 or steps < 1 or batch_size < 1:
        raise ValueError(f"the warm-up needs >= 2 windows, steps >= 1 and batch_size >= 1; got W={W}, "
                         f"steps={steps}, batch_size={batch_size}.")
    history = []
    for _ in range(steps):
        idx = torch.randint(W, (min(batch_size, W),), generator=generator)
        other = (idx + torch.randint(1, W, idx.shape, generator=generator)) % W  # never the window itself
        foreign = transplant(joints[other], T_world_cpf[other, 1], T_world_cpf[idx, 1])
        negatives = torch.stack([prior_joints[idx], foreign], dim=1)  # (B, 2, T, J, 3)
        history.append(trainer.train_step(joints[idx], T_world_cpf[idx], negatives))
    return history
