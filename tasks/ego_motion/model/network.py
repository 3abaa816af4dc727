"""The EgoAllo-style denoiser: predicts the clean motion x0 from a noisy motion, its timestep and the head condition.

Why this shape of network (docs/ego_motion_prior.md): the head trajectory and the body motion are two
aligned sequences of frames. An encoder stream (self-attention only) turns the per-frame head
features into a context; a decoder stream over the noisy motion attends to itself and then to
that context. Rotary position embeddings (RoPE) on queries and keys make every attention score a
function of the *relative* frame offset only, so one model serves any window length without a
positional table. The noise level is one extra token prepended to both streams, which lets
every frame read it through attention. Each modality of the packed motion (motion.py) has its own
input MLP (summed into one token per frame) and its own output head, so modalities with very
different statistics (3x3 rotations, shape coefficients, contact probabilities) are not forced
through one linear map.

Shapes: B batch, T frames, W width, H heads, Dh = W / H, D packed motion size (226 or 496).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Real
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from typing_extensions import assert_never

from diffgrpo.precision import scaled_dot_product_attention
from tasks.ego_motion.model.egoallo_checkpoint import EgoAlloDenoiser, load_egoallo_denoiser
from tasks.ego_motion.model.motion import modality_slices, motion_dim

NormPlacement = Literal["post", "pre"]


@dataclass(frozen=True)
class DenoiserConfig:
    """Size and options of :class:`MotionDenoiser`; saved as JSON beside the weights.

    Why presets and not forks: :meth:`reference` is the published size, :meth:`demo` the same
    architecture small enough to train on two CPU cores.
    """

    width: int = 512
    """Token width W of both streams."""
    ff_dim: int = 2048
    """Hidden size of each feed-forward block."""
    num_heads: int = 4
    """Attention heads; W / num_heads must be even (RoPE rotates pairs of channels)."""
    num_encoder_layers: int = 6
    """Self-attention layers over the condition stream."""
    num_decoder_layers: int = 6
    """Self- then cross-attention layers over the noisy-motion stream."""
    include_hands: bool = False
    """Generate the 30 hand rotations too (D = 496 instead of 226)."""
    cond_dim: int = 154
    """Per-frame condition features (154 from ``condition.encode_head_trajectory``)."""
    timestep_features: int = 256
    """Size of the sinusoidal timestep encoding fed to the noise-token MLP."""
    rope_base: float = 10000.0
    """RoPE wavelength base: channel pair i rotates by position * rope_base^(-2i / Dh)."""
    norm_placement: NormPlacement = "post"
    """'post' (LayerNorm after each residual sum, the reference) or 'pre' (before each block)."""

    def __post_init__(self) -> None:
        for name in ("width", "ff_dim", "num_heads", "cond_dim", "timestep_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"DenoiserConfig.{name}={getattr(self, name)} must be positive.")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"DenoiserConfig.{name}={getattr(self, name)} must be >= 0.")
        if self.width % self.num_heads != 0 or (self.width // self.num_heads) % 2 != 0:
            raise ValueError(
                f"width={self.width} with num_heads={self.num_heads} gives a head size that is not an "
                f"even integer; RoPE needs width divisible by 2 * num_heads. Change --width or --num-heads."
            )
        if self.timestep_features % 2 != 0:
            raise ValueError(f"timestep_features={self.timestep_features} must be even (cos and sin halves).")
        if self.norm_placement not in ("post", "pre"):
            raise ValueError(f"norm_placement={self.norm_placement!r}; expected 'post' or 'pre'.")

    @classmethod
    def reference(cls, include_hands: bool = False) -> DenoiserConfig:
        """The published size: W 512, FF 2048, 4 heads, 6 + 6 layers (47.2 M parameters)."""
        return cls(include_hands=include_hands)

    @classmethod
    def demo(cls, include_hands: bool = False) -> DenoiserConfig:
        """A small model of the same architecture for the 2-CPU-core demo (W 128, 2 + 2 layers, 1.19 M parameters)."""
        return cls(
            width=128, ff_dim=512, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
            include_hands=include_hands, timestep_features=128,
        )  # fmt: skip

    @property
    def motion_dim(self) -> int:
        return motion_dim(self.include_hands)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DenoiserConfig:
        """Inverse of :meth:`to_dict`. Unknown keys and wrongly typed values raise; missing keys
        take their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(defaults))
        if unknown:
            raise ValueError(f"unknown DenoiserConfig keys {unknown}; known keys are {sorted(defaults)}.")
        values = dict(values)
        for key, value in values.items():
            expected = type(defaults[key])
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok, values[key] = True, float(value)
            if not ok:
                raise TypeError(
                    f"DenoiserConfig.{key}={value!r} has type {type(value).__name__}, expected {expected.__name__}."
                )
        return cls(**values)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding


def rope_cos_sin(
    positions: Real[Tensor, " L"], head_dim: int, base: float = 10000.0
) -> tuple[Float[Tensor, "L {head_dim}//2"], Float[Tensor, "L {head_dim}//2"]]:
    """Cosines and sines of the RoPE angles, position * base^(-2i / head_dim), in float32.

    Why float32: angles reach hundreds of radians for long windows, beyond bf16 precision.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head size, got {head_dim}.")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, Dh/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Float[Tensor, "B H L Dh"], cos: Float[Tensor, "L Dh/2"], sin: Float[Tensor, "L Dh/2"]) -> Tensor:
    """Rotate channel pairs (i, i + Dh/2) of every token by its position's angles.

    Why: for a query rotated to position m and a key rotated to position n, their dot product is
    q^T R(n - m) k, a function of the offset n - m alone; attention becomes translation invariant.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def timestep_embedding(t: Real[Tensor, " B"], num_features: int) -> Float[Tensor, "B F"]:
    """Sinusoidal features of the (integer or real) timestep, periods from 2 pi to 2 pi * 10^4."""
    half = num_features // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, F/2)
    return torch.cat([args.cos(), args.sin()], dim=-1)


# ---------------------------------------------------------------------------------------------
# Blocks


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class RotaryAttention(nn.Module):
    """Multi-head attention with RoPE on queries and keys; self-attention when ``context`` is None."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(width, 2 * width)
        self.to_out = nn.Linear(width, width)

    def forward(
        self,
        x: Float[Tensor, "B Lq W"],
        rope_q: tuple[Tensor, Tensor],
        context: Float[Tensor, "B Lk W"] | None = None,
        rope_k: tuple[Tensor, Tensor] | None = None,
        key_mask: Bool[Tensor, "B 1 1 Lk"] | None = None,
    ) -> Float[Tensor, "B Lq W"]:
        if context is None:
            context, rope_k = x, rope_q
        assert rope_k is not None, "cross-attention needs the keys' RoPE angles (rope_k)"
        B, Lq, W = x.shape
        Lk = context.shape[1]
        q = self.to_q(x).view(B, Lq, self.num_heads, -1).transpose(1, 2)  # (B, H, Lq, Dh)
        k, v = self.to_kv(context).view(B, Lk, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, Lk, Dh)
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)
        # fp32 attention inside CPU autocast: bf16's CPU attention backward is ~3x slower (diffgrpo.precision).
        out = scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, Lq, Dh)
        return self.to_out(out.transpose(1, 2).reshape(B, Lq, W))


class _Residual(nn.Module):
    """One residual branch with its LayerNorm placed before ('pre') or after ('post') the sum."""

    def __init__(self, width: int, placement: NormPlacement) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.placement = placement

    def forward(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        if self.placement == "post":
            return self.norm(x + branch(x))
        elif self.placement == "pre":
            return x + branch(self.norm(x))
        else:
            assert_never(self.placement)


class EncoderLayer(nn.Module):
    """Condition stream layer: self-attention, feed-forward."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        self.attn = RotaryAttention(cfg.width, cfg.num_heads)
        self.ff = _mlp(cfg.width, cfg.ff_dim, cfg.width)
        self.res_attn = _Residual(cfg.width, cfg.norm_placement)
        self.res_ff = _Residual(cfg.width, cfg.norm_placement)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None) -> Tensor:
        x = self.res_attn(x, lambda h: self.attn(h, rope, key_mask=key_mask))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    """Motion stream layer: self-attention, cross-attention to the encoder output, feed-forward."""

    def __init__(self, cfg: DenoiserConfig) -> None:
        super().__init__()
        self.self_attn = RotaryAttention(cfg.width, cfg.num_heads)
        self.cross_attn = RotaryAttention(cfg.width, cfg.num_heads)
        self.ff = _mlp(cfg.width, cfg.ff_dim, cfg.width)
        self.res_self = _Residual(cfg.width, cfg.norm_placement)
        self.res_cross = _Residual(cfg.width, cfg.norm_placement)
        self.res_ff = _Residual(cfg.width, cfg.norm_placement)

    def forward(self, x: Tensor, memory: Tensor, rope: tuple[Tensor, Tensor], key_mask: Tensor | None) -> Tensor:
        x = self.res_self(x, lambda h: self.self_attn(h, rope, key_mask=key_mask))
        x = self.res_cross(x, lambda h: self.cross_attn(h, rope, memory, rope, key_mask=key_mask))
        return self.res_ff(x, self.ff)


# ---------------------------------------------------------------------------------------------
# The denoiser


class MotionDenoiser(nn.Module):
    """x0-prediction network: ``forward(x_t (B, T, D), t (B,), cond (B, T, C)) -> x0_hat (B, T, D)``.

    Token layout of both streams: [noise token, frame 1, ..., frame T] at RoPE positions 0..T, so
    frame i of the motion and frame i of the condition share a position and cross-attention
    sees their time offset. Deterministic (no dropout); train and eval modes compute the same.
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        W = config.width
        self.slices = modality_slices(config.include_hands)
        self.motion_in = nn.ModuleDict({n: _mlp(s.stop - s.start, W, W) for n, s in self.slices.items()})
        self.motion_out = nn.ModuleDict({n: _mlp(W, W, s.stop - s.start) for n, s in self.slices.items()})
        self.cond_in = _mlp(config.cond_dim, W, W)
        self.noise_mlp = _mlp(config.timestep_features, W, W)
        self.noise_to_encoder = nn.Linear(W, W)
        self.noise_to_decoder = nn.Linear(W, W)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised: close each stream with a LayerNorm.
        self.final_norms: nn.ModuleDict | None
        if config.norm_placement == "pre":
            self.final_norms = nn.ModuleDict({"encoder": nn.LayerNorm(W), "decoder": nn.LayerNorm(W)})
        elif config.norm_placement == "post":
            self.final_norms = None
        else:
            assert_never(config.norm_placement)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, x_t: Tensor, t: Tensor, cond: Tensor, attn_mask: Tensor | None) -> None:
        D, C = self.config.motion_dim, self.config.cond_dim
        if x_t.ndim != 3 or x_t.shape[-1] != D:
            raise ValueError(
                f"x_t has shape {tuple(x_t.shape)}, expected (B, T, {D}) for include_hands="
                f"{self.config.include_hands}; check DenoiserConfig.include_hands."
            )
        B, T, _ = x_t.shape
        if cond.shape != (B, T, C):
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, expected (B, T, cond_dim) = {(B, T, C)} "
                f"to match x_t; set DenoiserConfig.cond_dim or encode one condition per frame."
            )
        if t.shape != (B,):
            raise ValueError(
                f"t has shape {tuple(t.shape)}, expected ({B},): one timestep per sample; "
                f"use t.expand({B}) for a shared timestep."
            )
        if attn_mask is not None and (attn_mask.shape != (B, T) or attn_mask.dtype != torch.bool):
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)} and dtype {attn_mask.dtype}, "
                f"expected bool ({B}, {T}) with True at valid frames."
            )

    def forward(
        self,
        x_t: Float[Tensor, "B T D"],
        t: Real[Tensor, " B"],
        cond: Float[Tensor, "B T C"],
        attn_mask: Bool[Tensor, "B T"] | None = None,
    ) -> Float[Tensor, "B T D"]:
        """Predict x0 for noisy motion ``x_t`` at timesteps ``t`` under the per-frame condition.

        ``attn_mask`` (True = valid frame) hides padded frames from every attention, so windows
        of different lengths can share a batch; outputs at padded frames are meaningless.
        """
        self._check_inputs(x_t, t, cond, attn_mask)
        B, T, _ = x_t.shape
        positions = torch.arange(T + 1, device=x_t.device)  # (T+1,): noise token at 0
        rope = rope_cos_sin(positions, self.config.width // self.config.num_heads, self.config.rope_base)
        key_mask = None
        if attn_mask is not None:
            valid = torch.cat([attn_mask.new_ones(B, 1), attn_mask], dim=1)  # (B, T+1)
            key_mask = valid[:, None, None, :]  # (B, 1, 1, T+1)

        noise = self.noise_mlp(timestep_embedding(t, self.config.timestep_features))  # (B, W)

        enc = torch.cat([self.noise_to_encoder(noise)[:, None], self.cond_in(cond)], dim=1)  # (B, T+1, W)
        for layer in self.encoder:
            enc = layer(enc, rope, key_mask)
        if self.final_norms is not None:
            enc = self.final_norms["encoder"](enc)

        frames = sum(self.motion_in[n](x_t[..., s]) for n, s in self.slices.items())  # (B, T, W)
        dec = torch.cat([self.noise_to_decoder(noise)[:, None], frames], dim=1)  # (B, T+1, W)
        for layer in self.decoder:
            dec = layer(dec, enc, rope, key_mask)
        if self.final_norms is not None:
            dec = self.final_norms["decoder"](dec)

        h = dec[:, 1:]  # (B, T, W): drop the noise token
        # The slices are contiguous and in packing order, so concatenating the heads packs x0.
        return torch.cat([self.motion_out[n](h) for n in self.slices], dim=-1)  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# Saving and loading

_CONFIG_METADATA_KEY = "denoiser_config"


def save_denoiser(path: str | Path, model: MotionDenoiser) -> None:
    """Write the weights as safetensors with the config as JSON in the file's metadata.

    Why in the metadata: the file alone rebuilds the model; no separate config can go astray.
    """
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    save_file(tensors, str(path), metadata={_CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())})


def load_denoiser(path: str | Path, device: torch.device | str = "cpu") -> MotionDenoiser | EgoAlloDenoiser:
    """Rebuild a prior: a file written by :func:`save_denoiser`, or EgoAllo's released checkpoint folder.

    A folder (``model_config.yaml`` + ``checkpoints_<N>/model.safetensors``) goes to
    :func:`~tasks.ego_motion.model.egoallo_checkpoint.load_egoallo_denoiser` (docs/egoallo_checkpoint.md);
    both models take ``(x_t, t, cond)`` with diffusers timestep indices and have ``config.include_hands``.
    """
    if Path(path).is_dir():
        return load_egoallo_denoiser(path, device)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no denoiser weights at {path}; train them with recipes/pretrain_ego_motion.py, "
                                "use the shipped tasks/ego_motion/assets/demo_prior.safetensors, or pass EgoAllo's "
                                "checkpoint folder")
    with safe_open(str(path), framework="pt", device="cpu") as f:  # then .to(device): safetensors rejects 'cpu:0'
        metadata = f.metadata() or {}
        if _CONFIG_METADATA_KEY not in metadata:
            raise ValueError(
                f"{path} has no '{_CONFIG_METADATA_KEY}' metadata, so it was not written by "
                f"save_denoiser; build MotionDenoiser(config) and load_state_dict yourself."
            )
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    config = DenoiserConfig.from_dict(json.loads(metadata[_CONFIG_METADATA_KEY]))
    model = MotionDenoiser(config).to(device)
    model.load_state_dict(tensors, strict=True)
    return model
