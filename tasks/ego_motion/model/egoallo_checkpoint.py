"""EgoAllo's released motion prior: its network, loaded from the checkpoint folder (``egoallo_folder.py``).

Why a module of its own: MotionGRPO post-trains EgoAllo's published prior. That network predicts x0
like :class:`~tasks.ego_motion.model.network.MotionDenoiser` (post-norm encoder and decoder streams, RoPE,
one noise token, one MLP per modality) but differs in nearly every layer: the noise level is a row
of a learned table over the 1000 steps, projected to one token shared by both streams; attention
projections are fused and bias-free; RoPE rotates *adjacent* channel pairs with frequencies stored
in the file; the modality MLPs are deeper and the condition enters through one linear map. Adding
each of these as a switch to MotionDenoiser would fork it flag by flag. Here one class has
parameters named exactly like the checkpoint's keys, so the key mapping is the identity and
:func:`expected_shapes` (the manifest) is the one description of the layout.

Sources: docs/egoallo_checkpoint.md (folder layout, the 222-key manifest, the timestep numbering);
EgoAllo's ``src/egoallo/network.py`` (block order, read for understanding only); rotary-embedding-torch
0.8.6 (the RoPE variant the checkpoint was trained with).

x-space: EgoAllo packs ``betas`` 16 | ``body_rotmats`` 189 (21 x 3x3, row-major) | ``contacts`` 21 |
``hand_rotmats`` 270 (30 x 3x3), the order of its ``EgoDenoiseTraj.pack``; that is exactly
``motion.py``'s layout with hands (D = 496), so samples need no conversion (``modality_slices`` is
the one place the order is defined). Its condition ('ours', 3 Fourier frequencies) is
``condition.encode_head_trajectory`` (154 features, same order).

Shapes: B batch, T frames, L = d_latent, H heads, Dh = L / H, N = d_noise_emb, D packed motion,
C = d_cond = 154.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int, Real
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from tasks.ego_motion.model.egoallo_folder import (
    CONFIG_FILE,
    CONFIG_TAG,
    WEIGHTS_FILE,
    CheckpointFiles,
    EgoAlloConfig,
    UnsafeYamlTagError,
    check_tensors,
    expected_shapes,
    find_checkpoint_files,
    manifest_numel,
    read_config,
)
from tasks.ego_motion.model.motion import modality_slices

__all__ = [
    "CONFIG_FILE",
    "CONFIG_TAG",
    "WEIGHTS_FILE",
    "CheckpointFiles",
    "EgoAlloConfig",
    "UnsafeYamlTagError",
    "check_tensors",
    "expected_shapes",
    "find_checkpoint_files",
    "manifest_numel",
    "read_config",
    "EgoAlloBlock",
    "EgoAlloDenoiser",
    "StoredRotaryEmbedding",
    "load_egoallo_denoiser",
]

# ---------------------------------------------------------------------------------------------
# The network


def _activation(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU()


class StoredRotaryEmbedding(nn.Module):
    """RoPE as rotary-embedding-torch 0.8.6 applies it, with the frequencies read from the checkpoint.

    Why stored: EgoAllo's blocks keep ``rotary_emb.freqs`` (Dh/2,) in the state dict; they start as
    10000^(-2i / Dh) and were not trained, but the file is the authority, so the loaded values are
    used, never recomputed. A persistent buffer: saved and loaded, never given to the optimiser.

    Unlike ``network.apply_rope`` (halves), adjacent channels (2i, 2i+1) rotate by position * freqs[i]::

        out[2i] = x[2i] cos - x[2i+1] sin,     out[2i+1] = x[2i+1] cos + x[2i] sin

    Positions are 0..L-1 along dim -2; computed in float32, returned in the input dtype.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def forward(self, x: Float[Tensor, "B H L Dh"]) -> Float[Tensor, "B H L Dh"]:
        positions = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.freqs.float()[None, :]  # (L, Dh/2)
        cos, sin = angles.cos(), angles.sin()
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, L, Dh/2) each
        return torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2).to(x.dtype)


class EgoAlloBlock(nn.Module):
    """One of EgoAllo's post-norm transformer blocks; a decoder block with ``cross_attention``::

        x = layernorm1(x + SelfAttention(x))
        x = xattn_layernorm(x + CrossAttention(queries x, keys and values memory))   (decoder only)
        x = layernorm2(x + mlp1(act(mlp0(x))))

    Queries and keys of both attentions are rotated by this block's own stored RoPE frequencies.
    """

    def __init__(self, config: EgoAlloConfig, cross_attention: bool) -> None:
        super().__init__()
        L = config.d_latent
        self.num_heads = config.num_heads
        self.sattn_qkv_proj = nn.Linear(L, 3 * L, bias=False)
        self.sattn_out_proj = nn.Linear(L, L, bias=False)
        self.layernorm1 = nn.LayerNorm(L)
        self.layernorm2 = nn.LayerNorm(L)
        self.rotary_emb = StoredRotaryEmbedding(config.head_dim)
        self.mlp0 = nn.Linear(L, config.d_feedforward)
        self.activation = _activation(config.activation)
        self.mlp1 = nn.Linear(config.d_feedforward, L)
        self.cross_attention = cross_attention
        if cross_attention:
            self.xattn_kv_proj = nn.Linear(L, 2 * L, bias=False)
            self.xattn_q_proj = nn.Linear(L, L, bias=False)
            self.xattn_layernorm = nn.LayerNorm(L)
            self.xattn_out_proj = nn.Linear(L, L, bias=False)

    def _heads(self, projected: Tensor, parts: int) -> Tensor:
        """(B, S, parts * L) -> (parts, B, H, S, Dh): features ordered (part, head, channel)."""
        B, S, _ = projected.shape
        return projected.view(B, S, parts, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, out_proj: nn.Linear) -> Tensor:
        out = F.scaled_dot_product_attention(self.rotary_emb(q), self.rotary_emb(k), v)  # (B, H, S, Dh)
        return out_proj(out.transpose(1, 2).flatten(2))  # (B, S, L)

    def forward(
        self, x: Float[Tensor, "B S L"], memory: Float[Tensor, "B S L"] | None = None
    ) -> Float[Tensor, "B S L"]:
        q, k, v = self._heads(self.sattn_qkv_proj(x), 3)
        x = self.layernorm1(x + self._attend(q, k, v, self.sattn_out_proj))
        if self.cross_attention:
            assert memory is not None, "a decoder block needs the encoder output (memory)"
            k, v = self._heads(self.xattn_kv_proj(memory), 2)
            x = self.xattn_layernorm(x + self._attend(self._heads(self.xattn_q_proj(x), 1)[0], k, v,
                                                      self.xattn_out_proj))
        return self.layernorm2(x + self.mlp1(self.activation(self.mlp0(x))))


class EgoAlloDenoiser(nn.Module):
    """EgoAllo's x0-prediction network: ``forward(x_t (B, T, D), t (B,), cond (B, T, 154)) -> x0_hat (B, T, D)``.

    Same call as :class:`~tasks.ego_motion.model.network.MotionDenoiser`, so the task, the sampler and
    GRPO use it unchanged. Token layout of both streams: [noise token, frame 1..T] at RoPE positions
    0..T. No attention mask (the task never pads windows); no dropout. Parameter names are the
    checkpoint's keys (:func:`expected_shapes`).
    """

    def __init__(self, config: EgoAlloConfig) -> None:
        super().__init__()
        self.config = config
        L = config.d_latent
        self.slices = modality_slices(config.include_hands)
        act = lambda: _activation(config.activation)
        self.encoders = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(s.stop - s.start, L), act(), nn.Linear(L, L), act(), nn.Linear(L, L))
            for name, s in self.slices.items()})
        self.decoders = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(L, L), nn.LayerNorm(L), act(), nn.Linear(L, L), act(),
                                nn.Linear(L, s.stop - s.start))
            for name, s in self.slices.items()})
        self.latent_from_cond = nn.Linear(config.d_cond, L)
        self.noise_emb = nn.Embedding(config.max_t, config.d_noise_emb)
        self.noise_emb_token_proj = nn.Linear(config.d_noise_emb, L, bias=False)
        self.encoder_layers = nn.ModuleList(EgoAlloBlock(config, False) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(EgoAlloBlock(config, True) for _ in range(config.decoder_layers))

    def num_parameters(self) -> int:
        """Trainable numbers (the stored RoPE frequencies, buffers, are not counted)."""
        return sum(p.numel() for p in self.parameters())

    def noise_embedding_rows(self, t: Real[Tensor, " B"]) -> Int[Tensor, " B"]:
        """Row of ``noise_emb`` for each diffusers timestep index t in 0..max_t-1: the row is t itself.

        The one place the two numberings meet (egoallo-checkpoint.md: EgoAllo's t runs 1..1000 and
        is one more than diffusers' index). EgoAllo's network reads ``noise_emb(t_egoallo - 1)``;
        this project feeds every network diffusers' index i = t_egoallo - 1 (prior.py, motion.py's
        ``sampling_timesteps(convention="diffusers")``), so the row is (i + 1) - 1 = i.

        Raises:
            ValueError: when t is not integer-valued in [0, max_t) (e.g. the clean level -1, or
                EgoAllo's own numbering 1..1000 passed by mistake).
        """
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise ValueError(f"t={t.tolist()[:8]} are not integers; pass diffusers timestep indices.")
        rows = t.long()
        if not bool(((rows >= 0) & (rows < self.config.max_t)).all()):
            raise ValueError(f"t={rows.tolist()[:8]} lies outside 0..{self.config.max_t - 1}: pass diffusers indices "
                             "(EgoAllo's t - 1, e.g. 999 for the noisiest level), never the clean level -1.")
        return rows

    def forward(
        self, x_t: Float[Tensor, "B T D"], t: Real[Tensor, " B"], cond: Float[Tensor, "B T C"]
    ) -> Float[Tensor, "B T D"]:
        """Predict x0 for noisy motion ``x_t`` at diffusers timestep indices ``t`` under the per-frame condition."""
        D, C = self.config.motion_dim, self.config.d_cond
        if x_t.ndim != 3 or x_t.shape[-1] != D or cond.shape != (*x_t.shape[:2], C) or t.shape != x_t.shape[:1]:
            raise ValueError(f"got x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, cond {tuple(cond.shape)}; expected "
                             f"(B, T, {D}), (B,), (B, T, {C}) (include_hands={self.config.include_hands}: pass "
                             f"--task.include-hands {self.config.include_hands}).")
        noise_token = self.noise_emb_token_proj(self.noise_emb(self.noise_embedding_rows(t)))[:, None]  # (B, 1, L)
        enc = torch.cat([noise_token, self.latent_from_cond(cond)], dim=1)  # (B, T+1, L)
        frames = sum(self.encoders[n](x_t[..., s]) for n, s in self.slices.items())  # (B, T, L)
        dec = torch.cat([noise_token, frames], dim=1)  # (B, T+1, L)
        for layer in self.encoder_layers:
            enc = layer(enc)
        for layer in self.decoder_layers:
            dec = layer(dec, enc)
        h = dec[:, 1:]  # (B, T, L): drop the noise token
        return torch.cat([self.decoders[n](h) for n in self.slices], dim=-1)  # (B, T, D), packing order


# ---------------------------------------------------------------------------------------------
# Loading


def load_egoallo_denoiser(folder: str | Path, device: torch.device | str = "cpu") -> EgoAlloDenoiser:
    """Build :class:`EgoAlloDenoiser` from EgoAllo's checkpoint folder and load its weights strictly.

    Steps: :func:`find_checkpoint_files`, :func:`read_config` (safe YAML), read the safetensors on
    the CPU, :func:`check_tensors` against :func:`expected_shapes`, ``load_state_dict(strict=True)``,
    move to ``device``. The stored tensors (fp32 in the release) are copied into a float32 model.

    Raises:
        FileNotFoundError, UnsafeYamlTagError, ValueError, TypeError: see the functions above.
    """
    files = find_checkpoint_files(folder)
    config = read_config(files.config_path)
    with safe_open(str(files.weights_path), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    check_tensors(tensors, config, files.weights_path)
    model = EgoAlloDenoiser(config)
    model.load_state_dict(tensors, strict=True)
    return model.to(device)
