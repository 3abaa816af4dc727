"""The learned perceptual (visual) reward of MotionGRPO: phi(joints | head trajectory) -> plausibility score.

Why a learned reward (docs/ego_motion_rewards.md): the joint-level rewards compare a sample with one
ground truth, but many bodies fit a head trajectory and the policy's typical artefacts (jitter,
sliding feet, limbs that do not match the head's motion) are better judged by a critic that has
seen what real motion under that head looks like. The critic is trained online with InfoNCE at
temperature 0.07: the positive is the ground-truth motion with its own head trajectory; the hard
negatives are the current policy's x0 predictions at its last 3 sampling steps (decoded to joints
by the caller), optionally plus the other group members' final samples and other windows' truth
(``critic_data.py`` builds them, and the warm-up). Because the negatives move with the policy,
exploiting the critic stops paying once it has seen the exploit. It is frozen (eval mode, no
gradients) while it scores a batch for the policy.

Invariance, the same as the condition's (condition.py): each frame's joints are expressed in that
frame's *head frame with yaw removed*: subtract the CPF's horizontal position (x, y), rotate by
Rz(-psi) with psi the yaw of the CPF's forward axis (local +Z). Height above the floor stays
absolute. Each joint also carries its world velocity rotated into the same yaw-free frame (m/s).
Both are unchanged by a rotation of the whole scene about world +Z and a horizontal translation.
Frame t of the joints goes with head pose ``T_world_cpf[t + 1]`` (data/windows.py: T + 1 head poses, then
the T target frames that follow the first), which is also the frame whose condition uses poses t, t+1.

Network: per-joint token = Linear(6 features) + learned joint embedding + the frame's condition
token (an MLP of the 154 condition features), then one cross-attention from all joint tokens to
the condition tokens over time (RoPE on frame indices), then B blocks of (spatial attention across
the 22 joints of a frame, temporal attention across frames per joint with RoPE, MLP), pre-norm,
mean pooling over joints and frames, an MLP head, and ``tanh``.

Score range: s = tanh(.) lies in [-1, 1]. That bound is what makes temperature 0.07 meaningful
(the logits s / tau span [-14.3, 14.3], as for CLIP's cosine similarities) and keeps the visual
reward R_vis = exp(omega_vis * s) inside [exp(-omega_vis), exp(omega_vis)].

Shapes: N sequences, B conditions, M negatives per condition, T frames, J = 22 joints (pelvis +
21 body joints, SMPL-H order), W width, C = 154 condition features.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from tasks.ego_motion.body.geometry import NUM_BODY_JOINTS, rotation_about_z
from tasks.ego_motion.model.condition import NUM_CONDITION_FEATURES, encode_head_trajectory
from tasks.ego_motion.model.network import RotaryAttention, rope_cos_sin

STATE_FORMAT = "diffgrpo-perceptual-v1"
NUM_JOINT_FEATURES = 6  # yaw-free head-relative position (m) + yaw-free velocity (m/s)


@dataclass(frozen=True)
class PerceptualConfig:
    """Size of :class:`PerceptualModel` and the hyper-parameters of its own AdamW optimiser.

    Why the optimiser lives here: the critic trains online beside the policy with its own
    learning rate, and both must be restored from one checkpoint.
    """

    width: int = 64
    """Token width W."""
    num_heads: int = 4
    """Attention heads; width / num_heads must be an even integer (RoPE rotates channel pairs)."""
    num_blocks: int = 2
    """B blocks of (spatial attention, temporal attention, MLP)."""
    ff_dim: int = 128
    """Hidden size of each block's MLP."""
    cond_dim: int = NUM_CONDITION_FEATURES
    """Condition features per frame (154 from ``condition.encode_head_trajectory``)."""
    num_joints: int = NUM_BODY_JOINTS + 1
    """Joints per frame: pelvis + 21 body joints."""
    fps: float = 30.0
    """Frame rate of the motion, turning per-frame displacements into velocities in m/s."""
    rope_base: float = 10000.0
    """RoPE wavelength base of the temporal and cross attentions."""
    temperature: float = 0.07
    """InfoNCE temperature tau used by :class:`PerceptualTrainer`."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the critic."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    grad_clip_norm: float = 1.0
    """Clip the critic's gradient to this global L2 norm; 0 disables clipping."""
    seed: int = 0
    """Seed of the parameter initialisation (the global torch RNG is left untouched)."""

    def __post_init__(self) -> None:
        for name in ("width", "num_heads", "ff_dim", "cond_dim", "num_joints"):
            if getattr(self, name) < 1:
                raise ValueError(f"PerceptualConfig.{name}={getattr(self, name)} must be positive.")
        if self.num_blocks < 0:
            raise ValueError(f"PerceptualConfig.num_blocks={self.num_blocks} must be >= 0.")
        if self.width % self.num_heads != 0 or (self.width // self.num_heads) % 2 != 0:
            raise ValueError(
                f"width={self.width} with num_heads={self.num_heads} gives a head size that is not an even "
                f"integer; RoPE needs width divisible by 2 * num_heads. Change width or num_heads."
            )
        for name in ("fps", "temperature", "learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"PerceptualConfig.{name}={value!r} must be finite and > 0.")
        for name in ("weight_decay", "grad_clip_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"PerceptualConfig.{name}={value!r} must be finite and >= 0.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PerceptualConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise, missing keys take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PerceptualConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)


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


def visual_reward(scores: Float[Tensor, " N"], omega_vis: float) -> Float[Tensor, " N"]:
    """R_vis = exp(omega_vis * s) (docs/ego_motion_rewards.md).

    Why the scores must be bounded: exp of an unbounded logit lets one sample's reward dwarf the
    group and invites the policy to chase the critic's extrapolations. :class:`PerceptualModel`
    squashes with tanh, so s is in [-1, 1] and R_vis in [exp(-omega_vis), exp(omega_vis)].
    """
    if not (math.isfinite(omega_vis) and omega_vis > 0):
        raise ValueError(f"omega_vis={omega_vis!r} must be finite and > 0.")
    if scores.ndim != 1 or not scores.is_floating_point():
        raise ValueError(f"scores has shape {tuple(scores.shape)} and dtype {scores.dtype}; expected floating (N,).")
    if not bool(torch.isfinite(scores).all()) or bool((scores.abs() > 1.0 + 1e-6).any()):
        raise ValueError(
            "scores must be finite and lie in [-1, 1] (tanh-squashed); pass PerceptualTrainer.score(...) "
            "output, not raw logits."
        )
    return torch.exp(omega_vis * scores)


def canonical_joint_features(
    joints: Float[Tensor, "N T J 3"], T_world_cpf: Float[Tensor, "N T+1 4 4"], fps: float = 30.0
) -> Float[Tensor, "N T J 6"]:
    """Per joint: position relative to the frame's head (yaw removed, height kept) and velocity in m/s.

    Why: the critic must not care where in the world, or facing which way, a motion happens
    (module docstring). Frame t uses head pose ``T_world_cpf[:, t + 1]``. The velocity of frame t
    is (p_t - p_{t-1}) * fps, with frame 0 taking frame 1's; it is rotated by the same Rz(-psi_t).
    """
    if joints.shape[1] < 2:
        raise ValueError(f"joints has T={joints.shape[1]} frame(s); the velocity feature needs T >= 2.")
    dtype = torch.promote_types(joints.dtype, T_world_cpf.dtype)
    joints = joints.to(dtype)
    T_world_head = T_world_cpf[:, 1:].to(dtype)  # (N, T, 4, 4), aligned with the joint frames
    forward = T_world_head[..., :3, 2]  # (N, T, 3), the CPF's local +Z in the world
    R_canon_world = rotation_about_z(-torch.atan2(forward[..., 1], forward[..., 0]))  # (N, T, 3, 3)
    origin = T_world_head[..., :3, 3].clone()  # (N, T, 3)
    origin[..., 2] = 0.0  # keep height above the floor
    position = (R_canon_world[:, :, None] @ (joints - origin[:, :, None])[..., None])[..., 0]  # (N, T, J, 3)
    step = joints[:, 1:] - joints[:, :-1]  # (N, T-1, J, 3)
    velocity_world = torch.cat([step[:, :1], step], dim=1) * fps  # (N, T, J, 3)
    velocity = (R_canon_world[:, :, None] @ velocity_world[..., None])[..., 0]
    return torch.cat([position, velocity], dim=-1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class _JointAttention(nn.Module):
    """Self-attention across the joints of one frame, without positions: the learned joint
    embedding already tells the joints apart. One fused q/k/v projection (cheaper backward than
    ``nn.MultiheadAttention``, whose split of the packed projection allocates a zero tensor each)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: Float[Tensor, "L J W"]) -> Float[Tensor, "L J W"]:
        L, J, W = x.shape
        q, k, v = self.to_qkv(x).view(L, J, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (L, H, J, Dh) x3
        out = F.scaled_dot_product_attention(q, k, v)  # (L, H, J, Dh)
        return self.to_out(out.transpose(1, 2).reshape(L, J, W))


class _Block(nn.Module):
    """Pre-norm residual block: spatial attention (joints of one frame), temporal attention (one
    joint over frames, RoPE), MLP."""

    def __init__(self, cfg: PerceptualConfig) -> None:
        super().__init__()
        W = cfg.width
        self.norm_spatial, self.norm_temporal, self.norm_mlp = nn.LayerNorm(W), nn.LayerNorm(W), nn.LayerNorm(W)
        self.spatial = _JointAttention(W, cfg.num_heads)
        self.temporal = RotaryAttention(W, cfg.num_heads)
        self.mlp = _mlp(W, cfg.ff_dim, W)

    def forward(self, x: Float[Tensor, "N T J W"], rope_t: tuple[Tensor, Tensor]) -> Float[Tensor, "N T J W"]:
        N, T, J, W = x.shape
        h = self.norm_spatial(x).reshape(N * T, J, W)
        x = x + self.spatial(h).reshape(N, T, J, W)
        h = self.norm_temporal(x).transpose(1, 2).reshape(N * J, T, W)
        x = x + self.temporal(h, rope_t).reshape(N, J, T, W).transpose(1, 2)
        return x + self.mlp(self.norm_mlp(x))


class PerceptualModel(nn.Module):
    """phi(joints | head trajectory) -> score in [-1, 1] per sequence; higher = more plausible.

    ``forward(joints (N, T, 22, 3) world metres, T_world_cpf (N, T+1, 4, 4), cond (N, T, 154) | None)``;
    ``cond`` defaults to ``encode_head_trajectory(T_world_cpf)``. Inputs are cast to the
    parameters' dtype after canonicalisation. Deterministic (no dropout): train and eval agree.
    """

    def __init__(self, config: PerceptualConfig) -> None:
        super().__init__()
        self.config = config
        W = config.width
        self.joint_in = nn.Linear(NUM_JOINT_FEATURES, W)
        self.joint_embedding = nn.Parameter(torch.randn(config.num_joints, W) * 0.02)
        self.cond_in = _mlp(config.cond_dim, W, W)
        self.norm_query, self.norm_context = nn.LayerNorm(W), nn.LayerNorm(W)
        self.cross = RotaryAttention(W, config.num_heads)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(W)
        self.head = _mlp(W, W, 1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_inputs(self, joints: Tensor, T_world_cpf: Tensor, cond: Tensor | None = None) -> None:
        """Raise a ValueError naming the mismatch unless the shapes fit ``forward``."""
        J = self.config.num_joints
        if (
            not isinstance(joints, Tensor)
            or not joints.is_floating_point()
            or joints.ndim != 4
            or tuple(joints.shape[-2:]) != (J, 3)
        ):
            shape = tuple(joints.shape) if isinstance(joints, Tensor) else type(joints).__name__
            raise ValueError(
                f"joints has shape {shape}, expected a floating (N, T, {J}, 3) tensor of world positions in metres "
                f"(pelvis + 21 body joints); drop hand joints with joints[..., :{J}, :]."
            )
        N, T = joints.shape[:2]
        if not isinstance(T_world_cpf, Tensor) or tuple(T_world_cpf.shape) != (N, T + 1, 4, 4):
            shape = tuple(T_world_cpf.shape) if isinstance(T_world_cpf, Tensor) else type(T_world_cpf).__name__
            raise ValueError(
                f"T_world_cpf has shape {shape}, expected (N, T+1, 4, 4) = {(N, T + 1, 4, 4)} for joints "
                f"{tuple(joints.shape)}: the head window holds one pose more than the motion (data/windows.py)."
            )
        if cond is not None and tuple(cond.shape) != (N, T, self.config.cond_dim):
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, expected (N, T, cond_dim) = {(N, T, self.config.cond_dim)}; "
                f"pass encode_head_trajectory(T_world_cpf) or leave cond=None."
            )
        if T < 2:
            raise ValueError(f"joints has T={T} frame(s); the critic needs T >= 2 (velocities).")

    def forward(
        self,
        joints: Float[Tensor, "N T J 3"],
        T_world_cpf: Float[Tensor, "N T+1 4 4"],
        cond: Float[Tensor, "N T C"] | None = None,
    ) -> Float[Tensor, " N"]:
        self.check_inputs(joints, T_world_cpf, cond)
        dtype = self.joint_embedding.dtype
        if cond is None:
            cond = encode_head_trajectory(T_world_cpf)
        N, T, J, _ = joints.shape
        feats = canonical_joint_features(joints, T_world_cpf, self.config.fps).to(dtype)  # (N, T, J, 6)
        cond_tokens = self.cond_in(cond.to(dtype))  # (N, T, W)
        x = self.joint_in(feats) + self.joint_embedding + cond_tokens[:, :, None]  # (N, T, J, W)

        head_dim = self.config.width // self.config.num_heads
        frames = torch.arange(T, device=x.device)
        rope_t = rope_cos_sin(frames, head_dim, self.config.rope_base)  # (T, Dh/2) x2
        rope_q = rope_cos_sin(frames.repeat_interleave(J), head_dim, self.config.rope_base)  # (T*J, Dh/2) x2
        queries = self.norm_query(x).reshape(N, T * J, -1)  # token (t, j) at RoPE position t
        x = x + self.cross(queries, rope_q, self.norm_context(cond_tokens), rope_t).reshape(x.shape)

        for block in self.blocks:
            x = block(x, rope_t)
        pooled = self.norm_out(x).mean(dim=(1, 2))  # (N, W)
        return torch.tanh(self.head(pooled)[:, 0])  # (N,)


@dataclass(frozen=True)
class PerceptualState:
    """The critic and its optimiser as flat tensors plus JSON-able metadata.

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
    """Owns the critic and its AdamW optimiser; one InfoNCE step at a time, scoring while frozen.

    Why not a general trainer: the recipe alternates ``train_step`` with the policy update and
    calls ``score`` for the reward; everything else (which negatives, how often) stays in it.

    Several processes: pass the run's ``accelerator``. Every process then holds one replica of the
    critic, trained on its own batch with the gradients averaged over processes before each step
    (like DDP does for the policy), so all processes score with the same critic and the copy that
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
        policy's decoded x0 predictions, other samples, foreign truths: ``critic_data.py``), each
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
        """Raise on every process if the critic's weights differ across processes (two float64 checksums)."""
        if not self._is_distributed():
            return
        with torch.no_grad():
            flat = torch.cat([p.detach().flatten().double() for p in self.model.parameters()])
            weight = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device).remainder_(997)
            checksum = torch.stack([flat.sum(), (flat * weight).sum()])
            table = self.accelerator.gather(checksum).view(self.accelerator.num_processes, 2)
        if not bool((table == table[0]).all()):
            raise RuntimeError(
                f"perceptual critic replicas differ across processes after step {self.num_steps} (weight "
                f"checksums per process: {table.tolist()}); every process must build the trainer with the same "
                f"PerceptualConfig (seed) and accelerator, and call train_step equally often."
            )

    def score(self, joints: Float[Tensor, "N T J 3"], T_world_cpf: Float[Tensor, "N T+1 4 4"]) -> Float[Tensor, " N"]:
        """Scores in [-1, 1] with the critic frozen (eval mode, no gradients); the mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                device = self.model.joint_embedding.device
                return self.model(joints.to(device), T_world_cpf.to(device))
        finally:
            self.model.train(was_training)

    def state_dict(self, prefix: str = "perceptual.") -> PerceptualState:
        """Snapshot (cloned tensors) of the critic, its optimiser and the step count."""
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
