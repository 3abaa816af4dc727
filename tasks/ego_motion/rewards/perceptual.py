"""The learned perceptual reward of MotionGRPO (the paper's "visual-level reward" R_vis): training and scoring.

Why a learned reward (docs/ego_motion_rewards.md): the joint-level rewards compare a sample with one
ground truth, but many bodies fit a head trajectory and the policy's typical artefacts (jitter,
sliding feet, limbs that do not match the head's motion) are better judged by a model that has
seen what real motion under that head looks like. The perceptual model is trained online with InfoNCE at
temperature 0.07: the positive is the ground-truth motion with its own head trajectory; the hard
negatives are the current policy's x0 predictions at its last 3 sampling steps (decoded to joints
by the caller), optionally plus the other group members' final samples and other windows' truth
(``perceptual_data.py`` builds them, and the warm-up). Because the negatives move with the policy,
exploiting the perceptual model stops paying once it has seen the exploit. It is frozen (eval mode, no
gradients) while it scores a batch for the policy.

The network and the invariant features it reads are ``perceptual_model.py``.

Score range: s = tanh(.) lies in [-1, 1]. That bound is what makes temperature 0.07 meaningful
(the logits s / tau span [-14.3, 14.3], as for CLIP's cosine similarities) and keeps the perceptual
reward R_vis = exp(perceptual_omega * s) inside [exp(-perceptual_omega), exp(perceptual_omega)].

Shapes: N sequences, B conditions, M negatives per condition, T frames, J = 22 joints (pelvis +
21 body joints, SMPL-H order), W width, C = 154 condition features.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from diffgrpo.modes import evaluation_mode
from tasks.ego_motion.model.condition import encode_head_trajectory
from tasks.ego_motion.rewards.perceptual_model import PerceptualConfig, PerceptualModel, canonical_joint_features

STATE_FORMAT = "diffgrpo-perceptual-v1"

__all__ = ["STATE_FORMAT", "PerceptualConfig", "PerceptualModel", "PerceptualState", "PerceptualTrainer",
           "canonical_joint_features", "info_nce_loss", "perceptual_reward"]


def info_nce_loss(
    score_pos: Float[Tensor, " B"], score_neg: Float[Tensor, "B M"], temperature: float = 0.07
) -> Float[Tensor, ""]:
    """InfoNCE with one positive and M negatives per row, in nats.

    loss = mean_b -log( exp(s_pos,b / tau) / (exp(s_pos,b / tau) + sum_m exp(s_neg,b,m / tau)) ),
    computed as mean_b [logsumexp_b(all logits) - s_pos,b / tau] so large logits cannot overflow.
    """
    if score_pos.ndim != 1 or score_neg.ndim != 2 or score_neg.shape[0] != score_pos.shape[0]:
        raise ValueError(
            f"score_pos has shape {tuple(score_pos.shape)} and score_neg {tuple(score_neg.shape)}; expected "
            f"(B,) and (B, M): one positive and M negatives per condition."
        )
    if score_neg.shape[1] < 1:
        raise ValueError("score_neg has M = 0 negatives per condition; InfoNCE needs at least one.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be finite and > 0.")
    logits = torch.cat([score_pos[:, None], score_neg], dim=1) / temperature  # (B, 1 + M)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def perceptual_reward(scores: Float[Tensor, " N"], perceptual_omega: float) -> Float[Tensor, " N"]:
    """R_vis = exp(perceptual_omega * s) (docs/ego_motion_rewards.md).

    Why the scores must be bounded: exp of an unbounded logit lets one sample's reward dwarf the
    group and invites the policy to chase the perceptual model's extrapolations. :class:`PerceptualModel`
    squashes with tanh, so s is in [-1, 1] and R_vis in [exp(-perceptual_omega), exp(perceptual_omega)].
    """
    if not (math.isfinite(perceptual_omega) and perceptual_omega > 0):
        raise ValueError(f"perceptual_omega={perceptual_omega!r} must be finite and > 0.")
    if scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"scores has shape {tuple(scores.shape)} and dtype {scores.dtype}; expected floating (N,).")
    if not bool(torch.isfinite(scores).all()) or bool((scores.abs() > 1.0 + 1e-6).any()):
        raise ValueError(
            "scores must be finite and lie in [-1, 1] (tanh-squashed); pass PerceptualTrainer.score(...) "
            "output, not raw logits."
        )
    return torch.exp(perceptual_omega * scores)


@dataclass(frozen=True)
class PerceptualState:
    """The perceptual model and its optimiser as flat tensors plus JSON-able metadata.

    Why this split: ``diffgrpo.checkpoint.save_checkpoint(shared_tensors=..., meta=...)`` stores
    tensors in safetensors and everything else as JSON, never pickles. Pass
    ``shared_tensors=state.tensors, meta={"perceptual": state.meta}`` and load back with
    ``trainer.load_state_dict(ckpt.shared_tensors, ckpt.meta["perceptual"])``.
    """

    tensors: dict[str, Tensor]
    """``<prefix>model.<param>`` and ``<prefix>optimizer.<param index>.<key>`` (AdamW moments, step)."""
    meta: dict[str, Any]
    """format, config, num_steps, optimiser param groups and non-tensor per-parameter state."""


class PerceptualTrainer:
    """Owns the perceptual model and its AdamW optimiser; one InfoNCE step at a time, scoring while frozen.

    Why not a general trainer: the recipe alternates ``train_step`` with the policy update and
    calls ``score`` for the reward; everything else (which negatives, how often) stays in it.

    Several processes: pass the run's ``accelerator``. Every process then holds one replica of the
    perceptual model, trained on its own batch with the gradients averaged over processes before each step
    (like DDP does for the policy), so all processes score with the same perceptual model and the copy that
    rank 0 checkpoints is every rank's. The seed gives every replica the same initial weights, and
    each step compares a checksum of the weights across processes and raises if they differ.
    ``train_step`` is then a collective: every process must call it, as often, in the same order.
    """

    def __init__(
        self, config: PerceptualConfig | None = None, device: torch.device | str = "cpu", accelerator=None
    ) -> None:
        self.config = config or PerceptualConfig()
        self.accelerator = accelerator
        """Averages gradients and checks replicas across processes; None (or one process): local only."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = PerceptualModel(self.config)
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        self.num_steps = 0

    def train_step(
        self,
        pos_joints: Float[Tensor, "B T J 3"],
        pos_T_world_cpf: Float[Tensor, "B T+1 4 4"],
        neg_joints: Float[Tensor, "B M T J 3"],
        neg_T_world_cpf: Float[Tensor, "B M T+1 4 4"] | None = None,
    ) -> dict[str, float]:
        """One AdamW step on InfoNCE over condition b's positive and its M negatives.

        ``neg_joints[b]`` are bodies that should score below the truth for condition b (the
        policy's decoded x0 predictions, other samples, foreign truths: ``perceptual_data.py``), each
        scored on its head ``neg_T_world_cpf[b, m]`` (world metres); None: every negative on its
        condition's head ``pos_T_world_cpf[b]``. Inputs are detached: no gradient reaches the
        policy. Returns loss (nats), accuracy (fraction of conditions whose positive beats every
        negative), mean positive/negative scores, their gap, the gradient norm.

        Raises:
            ValueError: the shapes of the negatives (or their heads) do not fit the positives.
        """
        if (
            neg_joints.ndim != 5
            or neg_joints.shape[0] != pos_joints.shape[0]
            or (neg_joints.shape[2:] != pos_joints.shape[1:])
        ):
            raise ValueError(
                f"neg_joints has shape {tuple(neg_joints.shape)}, expected (B, M, T, J, 3) with (B, T, J, 3) = "
                f"{tuple(pos_joints.shape)} from pos_joints; stack the M negatives of each condition on dim 1."
            )
        B, M = neg_joints.shape[:2]
        if M < 1:
            raise ValueError("neg_joints has M = 0 negatives per condition; InfoNCE needs at least one.")
        self.model.check_inputs(pos_joints, pos_T_world_cpf)
        if neg_T_world_cpf is not None and tuple(neg_T_world_cpf.shape) != (B, M, *pos_T_world_cpf.shape[1:]):
            raise ValueError(
                f"neg_T_world_cpf has shape {tuple(neg_T_world_cpf.shape)}, expected (B, M, T+1, 4, 4) = "
                f"{(B, M, *pos_T_world_cpf.shape[1:])}: one head window per negative (or None: the positive's)."
            )
        device = self.model.joint_embedding.device
        pos_joints, pos_T_world_cpf, neg_joints = (
            t.detach().to(device) for t in (pos_joints, pos_T_world_cpf, neg_joints)
        )
        joints = torch.cat([pos_joints[:, None], neg_joints], dim=1).flatten(0, 1)  # (B * (1+M), T, J, 3)
        if neg_T_world_cpf is None:
            T_world_cpf = pos_T_world_cpf[:, None].expand(B, 1 + M, *pos_T_world_cpf.shape[1:]).flatten(0, 1)
            cond = encode_head_trajectory(pos_T_world_cpf)  # (B, T, C), once per condition
            cond = cond[:, None].expand(B, 1 + M, *cond.shape[1:]).flatten(0, 1)
        else:
            heads = torch.cat([pos_T_world_cpf[:, None], neg_T_world_cpf.detach().to(pos_T_world_cpf)], dim=1)
            T_world_cpf = heads.flatten(0, 1)  # (B * (1+M), T+1, 4, 4)
            cond = encode_head_trajectory(T_world_cpf)

        self.model.train()
        scores = self.model(joints, T_world_cpf, cond).view(B, 1 + M)  # [B, 1+M]
        loss = info_nce_loss(scores[:, 0], scores[:, 1:], self.config.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        clip = self.config.grad_clip_norm if self.config.grad_clip_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.num_steps += 1
        self._check_replicas_agree()

        s = scores.detach()
        return {
            "loss": float(loss.detach()),
            "accuracy": float((s[:, :1] > s[:, 1:]).all(dim=1).float().mean()),
            "score_pos": float(s[:, 0].mean()),
            "score_neg": float(s[:, 1:].mean()),
            "score_gap": float((s[:, 0] - s[:, 1:].mean(dim=1)).mean()),
            "grad_norm": float(grad_norm),
        }

    def _is_distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    def _average_gradients(self) -> None:
        """Replace each gradient by its mean over processes, in one all-reduce of the flattened gradients."""
        if not self._is_distributed():
            return
        params = list(self.model.parameters())
        for p in params:  # every process must contribute the same entries, used or not
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = self.accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(g.view_as(p))

    def _check_replicas_agree(self) -> None:
        """Raise on every process if the perceptual model's weights differ across processes (two float64 checksums)."""
        if not self._is_distributed():
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten().double() for p in self.model.parameters()])
            weight = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(997)
            checksum = torch.stack([flat.sum(), (flat * weight).sum()])
            table = self.accelerator.gather(checksum).view(self.accelerator.num_processes, 2)
        if not bool((table == table[0]).all()):
            raise RuntimeError(
                f"perceptual model replicas differ across processes after step {self.num_steps} (weight "
                f"checksums per process: {table.tolist()}); every process must build the trainer with the same "
                f"PerceptualConfig (seed) and accelerator, and call train_step equally often."
            )

    def score(self, joints: Float[Tensor, "N T J 3"], T_world_cpf: Float[Tensor, "N T+1 4 4"]) -> Float[Tensor, " N"]:
        """Scores in [-1, 1] with the perceptual model frozen (eval mode, no gradients); the mode is restored after."""
        with evaluation_mode(self.model), torch.no_grad():
            device = self.model.joint_embedding.device
            return self.model(joints.to(device), T_world_cpf.to(device))

    def state_dict(self, prefix: str = "perceptual.") -> PerceptualState:
        """Snapshot (cloned tensors) of the perceptual model, its optimiser and the step count."""
        tensors = {f"{prefix}model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for param_id, param_state in opt["state"].items():
            for key, value in param_state.items():
                if isinstance(value, Tensor):
                    tensors[f"{prefix}optimizer.{param_id}.{key}"] = value.detach().clone()
                else:
                    scalars.setdefault(str(param_id), {})[key] = value
        meta = {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "num_steps": self.num_steps,
            "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
        }
        return PerceptualState(tensors=tensors, meta=meta)

    def load_state_dict(
        self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], prefix: str = "perceptual."
    ) -> None:
        """Restore from :meth:`state_dict` output; tensors without ``prefix`` are ignored, so a whole
        checkpoint's ``shared_tensors`` can be passed. The saved config must equal this trainer's."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(
                f"meta has format {meta.get('format')!r}, expected {STATE_FORMAT!r}; pass the "
                f"meta written by PerceptualTrainer.state_dict()."
            )
        saved = PerceptualConfig.from_dict(meta["config"])
        if saved != self.config:
            diff = {k: (v, getattr(self.config, k)) for k, v in saved.to_dict().items() if getattr(self.config, k) != v}
            raise ValueError(
                f"saved PerceptualConfig differs (saved, current): {diff}; build the trainer with "
                f"PerceptualConfig.from_dict(meta['config'])."
            )
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        model_state = {k[len("model.") :]: v.clone() for k, v in own.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        opt_state: dict[int, dict[str, Any]] = {}
        for name, value in own.items():
            if name.startswith("optimizer."):
                _, param_id, key = name.split(".", 2)
                opt_state.setdefault(int(param_id), {})[key] = value.clone()
        for param_id, extra in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(param_id), {}).update(extra)
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
        self.num_steps = int(meta["num_steps"])
