"""The perceptual model phi(joints | head trajectory) -> plausibility score in [-1, 1]: its features and network.

Why apart from its training (``perceptual.py``): the network and the invariant features it reads are
one concept (what the model sees and how it looks), the InfoNCE training, the reward's squashing and
the checkpoint state another (how it learns and is used).

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
from tasks.ego_motion.model.network import RotaryAttention, feed_forward, rope_cos_sin

NUM_JOINT_FEATURES = 6  # yaw-free head-relative position (m) + yaw-free velocity (m/s)


@dataclass(frozen=True)
class PerceptualConfig:
    """Size of :class:`PerceptualModel` and the hyper-parameters of its own AdamW optimiser.

    Why the optimiser lives here: the perceptual model trains online beside the policy with its own
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
    """AdamW learning rate of the perceptual model."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    grad_clip_norm: float = 1.0
    """Clip the perceptual model's gradient to this global L2 norm; 0 disables clipping."""
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


def canonical_joint_features(
    joints: Float[Tensor, "N T J 3"], T_world_cpf: Float[Tensor, "N T+1 4 4"], fps: float = 30.0
) -> Float[Tensor, "N T J 6"]:
    """Per joint: position relative to the frame's head (yaw removed, height kept) and velocity in m/s.

    Why: the perceptual model must not care where in the world, or facing which way, a motion happens
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
        self.mlp = feed_forward(W, cfg.ff_dim, W)

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
        self.cond_in = feed_forward(config.cond_dim, W, W)
        self.norm_query, self.norm_context = nn.LayerNorm(W), nn.LayerNorm(W)
        self.cross = RotaryAttention(W, config.num_heads)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(W)
        self.head = feed_forward(W, W, 1)

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
            raise ValueError(f"joints has T={T} frame(s); the perceptual model needs T >= 2 (velocities).")

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
