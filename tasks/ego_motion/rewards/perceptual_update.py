"""MotionGRPO Algorithm 1 line 10: after each policy update, train the perceptual model on the negatives.

Why a class and not closures inside the job: the perceptual model's step is a piece of the algorithm in its own
right (its negatives, its number of InfoNCE steps, what it logs, what it saves in a checkpoint and
which settings a resume must keep), so it has one named home, testable alone; the job hands its
methods to the one GRPO loop (``diffgrpo.trainer.LoopHooks``). Its weights and optimiser travel in the
checkpoints, with the perceptual model settings, which a resume must match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from diffgrpo.checkpoint import Checkpoint
from diffgrpo.task import Batch
from diffgrpo.train_step import RolloutBatch
from diffgrpo.trainer import LoopHooks
from tasks.ego_motion.rewards.perceptual import PerceptualTrainer
from tasks.ego_motion.rewards.perceptual_data import NegativeKind, group_correlations, rollout_negatives
from tasks.ego_motion.task import EgoMotionTask

RENAMED_SETTINGS = {"critic_negatives": "perceptual_negatives", "critic_on_own_head": "perceptual_on_own_head",
                    "critic_warmup_steps": "perceptual_warmup_steps",
                    "critic_warmup_batch_size": "perceptual_warmup_batch_size"}
"""Settings keys of checkpoints written before the learned reward had one name -> today's keys."""


def group_agreement(data: RolloutBatch, reward: str, reference: str, group_size: int) -> float:
    """Mean over groups of the Pearson correlation of two sub-rewards across the group's members (NaN if
    either is missing): does the learned reward rank a group's samples as the accuracy reward does?"""
    if reward not in data.rewards or reference not in data.rewards or group_size < 2:
        return float("nan")
    per_group = group_correlations(data.rewards[reward], data.rewards[reference], group_size)
    valid = per_group[torch.isfinite(per_group)]
    return float(valid.mean()) if len(valid) else float("nan")


@dataclass
class PerceptualUpdate:
    """The perceptual model's training step between policy updates, and its checkpoint state."""

    task: EgoMotionTask
    model: PerceptualTrainer
    group_size: int
    negatives: tuple[NegativeKind, ...]
    """What the perceptual model contrasts each condition's truth with (``perceptual_data.rollout_negatives``)."""
    on_own_head: bool
    """Score the policy's negatives on the (perturbed) head each chain was sampled for."""
    steps: int
    """InfoNCE steps per GRPO iteration."""
    settings: dict
    """The perceptual model flags a resumed run must keep (JSON-able), saved with every checkpoint."""

    def after_update(self, iteration: int, data: RolloutBatch, batch: Batch) -> dict[str, float]:
        """Train on this iteration's negatives; returns ``perceptual/*`` scalars (the last step's InfoNCE
        statistics and the agreement of the learned reward with ``ego_pos`` within groups)."""
        negatives, heads = rollout_negatives(self.task, data, batch, self.group_size, self.negatives,
                                             on_own_head=self.on_own_head)
        for _ in range(self.steps):
            stats = self.model.train_step(batch["joints_world"], batch["T_world_cpf"], negatives, heads)
        stats["agreement_with_ego_pos"] = group_agreement(data, "ego_perceptual", "ego_pos", self.group_size)
        return {f"perceptual/{k}": float(v) for k, v in stats.items()}

    def shared_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The perceptual model's tensors, and as metadata its own state and the perceptual model settings."""
        state = self.model.state_dict()
        return state.tensors, {"perceptual": json.dumps(state.meta), "critic": json.dumps(self.settings)}

    def load_shared_state(self, ckpt: Checkpoint) -> None:
        """Restore the perceptual model; ValueError naming the differences when the checkpoint's settings differ."""
        saved = json.loads(ckpt.meta.get("critic", "null"))  # "critic": the key's name since the first release
        if saved is not None:  # checkpoints written before the rename spell the settings critic_*
            saved = {RENAMED_SETTINGS.get(k, k): v for k, v in saved.items()}
        if saved is not None and saved != self.settings:  # checkpoints written before these flags carry none
            changed = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
            raise ValueError(f"--resume with other perceptual-model settings than the checkpoint's (saved, now): "
                             f"{changed}; "
                             "resume with the saved flags or start a new --output-dir.")
        self.model.load_state_dict(ckpt.shared_tensors, json.loads(ckpt.meta["perceptual"]))

    def hooks(self) -> LoopHooks:
        """This step as the loop's hooks."""
        return LoopHooks(after_update=self.after_update, shared_state=self.shared_state,
                         load_shared_state=self.load_shared_state)
