"""EgoAllo's released motion prior: its checkpoint folder, read safely and strictly, and its network.

Why a module of its own: MotionGRPO post-trains EgoAllo's published prior. That network predicts x0
like :class:`~tasks.ego_motion.model.network.MotionDenoiser` (post-norm encoder and decoder streams, RoPE,
one noise token, one MLP per modality) but differs in nearly every layer: the noise level is a row
of a learned table over the 1000 steps, projected to one token shared by both streams; attention
projections are fused and bias-free; RoPE rotates *adjacent* channel pairs with frequencies stored
in the file; the modality MLPs are deeper and the condition enters through one linear map. Adding
each of these as a switch to MotionDenoiser would fork it flag by flag. Here one class has
parameters named exactly like the checkpoint's keys, so the key mapping is the identity and
:func:`expected_shapes` (the manifest) is the one description of the layout.

Sources: /work/shared/docs/egoallo-checkpoint.md (folder layout, the 222-key manifest, the timestep
numbering); EgoAllo's ``src/egoallo/network.py`` (block order, read for understanding only);
rotary-embedding-torch 0.8.6 (the RoPE variant the checkpoint was trained with).

x-space: EgoAllo packs ``betas`` 16 | ``body_rotmats`` 189 (21 x 3x3, row-major) | ``contacts`` 21 |
``hand_rotmats`` 270 (30 x 3x3), the order of its ``EgoDenoiseTraj.pack``; that is exactly
``motion.py``'s layout with hands (D = 496), so samples need no conversion (``modality_slices`` is
the one place the order is defined). Its condition ('ours', 3 Fourier frequencies) is
``condition.encode_head_trajectory`` (154 features, same order).

Shapes: B batch, T frames, L = d_latent, H heads, Dh = L / H, N = d_noise_emb, D packed motion,
C = d_cond = 154.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from jaxtyping import Float, Int, Real
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from tasks.ego_motion.model.condition import FOURIER_FREQUENCIES, NUM_CONDITION_FEATURES
from tasks.ego_motion.model.motion import modality_slices, motion_dim
from tasks.ego_motion.model.prior import NUM_TRAIN_TIMESTEPS

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "model.safetensors"
CONFIG_TAG = "tag:yaml.org,2002:python/object:egoallo.network.EgoDenoiserConfig"
"""The one YAML tag accepted (written ``!!python/object:egoallo.network.EgoDenoiserConfig``)."""
_CHECKPOINT_DIR = re.compile(r"checkpoints_(\d+)")

# ---------------------------------------------------------------------------------------------
# model_config.yaml


class UnsafeYamlTagError(ValueError):
    """A YAML tag other than :data:`CONFIG_TAG` and the plain YAML types; raised before anything is built."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus exactly one tag, EgoAllo's config class, read as a plain mapping."""


def _config_as_mapping(loader: _ConfigLoader, node: yaml.Node) -> dict:
    if not isinstance(node, yaml.MappingNode):
        raise UnsafeYamlTagError(f"the {CONFIG_TAG} tag at {node.start_mark} must label a mapping of fields.")
    return loader.construct_mapping(node, deep=True)


def _refuse_tag(loader: _ConfigLoader, node: yaml.Node) -> None:
    raise UnsafeYamlTagError(
        f"refused YAML tag {node.tag!r} at {node.start_mark}: only !!python/object:egoallo.network."
        "EgoDenoiserConfig and plain YAML values are read (no Python object was built, nothing ran). Remove the tag "
        "or rewrite the file with plain values.")


_ConfigLoader.add_constructor(CONFIG_TAG, _config_as_mapping)
_ConfigLoader.add_constructor(None, _refuse_tag)  # every tag without a safe constructor, python/* included


@dataclass(frozen=True)
class EgoAlloConfig:
    """The fields of EgoAllo's ``EgoDenoiserConfig`` (spelled as EgoAllo spells them), from model_config.yaml.

    Defaults are EgoAllo's, so a field absent from the file takes the value EgoAllo's own loader
    would give it. Only the released checkpoint's settings are implemented: any other value of the
    fields in ``_SUPPORTED`` raises, naming the field.
    """

    max_t: int = 1000
    """Rows of the noise-embedding table, one per diffusion step; must equal prior.NUM_TRAIN_TIMESTEPS."""
    fourier_enc_freqs: int = 3
    """Fourier frequencies 2^0..2^(n-1) of the condition; 3 = condition.FOURIER_FREQUENCIES (1, 2, 4)."""
    d_latent: int = 512
    """Token width L of both streams."""
    d_feedforward: int = 2048
    """Hidden size of each block's feed-forward."""
    d_noise_emb: int = 1024
    """Width N of a noise-embedding row."""
    num_heads: int = 4
    """Attention heads; L / num_heads must be even (RoPE rotates channel pairs)."""
    encoder_layers: int = 6
    """Self-attention blocks over the condition stream."""
    decoder_layers: int = 6
    """Self- then cross-attention blocks over the noisy-motion stream."""
    dropout_p: float = 0.0
    """EgoAllo's training dropout; never applied here (sampling and the GRPO ratio need a deterministic network)."""
    activation: str = "gelu"
    """'gelu' (exact erf form) or 'relu'."""
    positional_encoding: str = "rope"
    """Only 'rope' (rotary, relative positions) is implemented; EgoAllo also had 'transformer' (sinusoids)."""
    noise_conditioning: str = "token"
    """Only 'token' (one prepended noise token) is implemented; EgoAllo also had 'film'."""
    xattn_mode: str = "kv_from_cond_q_from_x"
    """Cross-attention queries come from the motion stream, keys and values from the condition stream."""
    include_canonicalized_cpf_rotation_in_cond: bool = True
    """Must be True: the 9 yaw-free rotation channels are part of the 154 condition features."""
    include_hands: bool = True
    """The packed motion includes the 30 hand rotations (D = 496)."""
    cond_param: str = "ours"
    """Only 'ours' (condition.encode_head_trajectory) is implemented."""
    include_hand_positions_cond: bool = False
    """Must be False: no hand positions in the condition."""

    def __post_init__(self) -> None:
        unsupported = [f"{name}={getattr(self, name)!r} (implemented: {value!r})"
                       for name, value in _SUPPORTED.items() if getattr(self, name) != value]
        if unsupported:
            raise ValueError(f"model_config.yaml sets {', '.join(unsupported)}; only the released checkpoint's "
                             "network is implemented (token noise conditioning, RoPE, the 154-feature head "
                             "condition, 1000 diffusion steps).")
        for name in ("d_latent", "d_feedforward", "d_noise_emb", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model_config.yaml: {name}={getattr(self, name)} must be positive.")
        if min(self.encoder_layers, self.decoder_layers) < 0:
            raise ValueError(f"model_config.yaml: encoder_layers={self.encoder_layers} and decoder_layers="
                             f"{self.decoder_layers} must be >= 0.")
        if self.d_latent % self.num_heads != 0 or (self.d_latent // self.num_heads) % 2 != 0:
            raise ValueError(f"model_config.yaml: d_latent={self.d_latent} with num_heads={self.num_heads} gives no "
                             "even head size; RoPE needs d_latent divisible by 2 * num_heads.")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"model_config.yaml: activation={self.activation!r}; expected 'gelu' or 'relu'.")

    @property
    def d_cond(self) -> int:
        """Condition features per frame: 22 raw head channels x (1 + 2 x 3 frequencies) = 154."""
        return NUM_CONDITION_FEATURES

    @property
    def head_dim(self) -> int:
        return self.d_latent // self.num_heads

    @property
    def motion_dim(self) -> int:
        """D, the packed motion size (496 with hands, 226 without)."""
        return motion_dim(self.include_hands)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], source: str | Path = "model_config.yaml") -> EgoAlloConfig:
        """Validate the parsed fields: unknown names and wrongly typed values raise, naming them.

        A stored ``d_cond`` (EgoAllo's cached property, dumped when it had been read) must equal 154.
        """
        values = dict(values)
        stored_d_cond = values.pop("d_cond", None)
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ValueError(f"{source}: unknown EgoDenoiserConfig fields {unknown}; this loader knows "
                             f"{sorted(kinds)} (EgoAllo's network at the released checkpoint). A newer EgoAllo "
                             "network is not supported.")
        for name, value in values.items():
            expected = kinds[name]
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                ok, values[name] = True, float(value)
            if not ok:
                raise TypeError(f"{source}: {name}={value!r} is a {type(value).__name__}, "
                                f"expected {expected.__name__}.")
        config = cls(**values)
        if stored_d_cond is not None and stored_d_cond != config.d_cond:
            raise ValueError(f"{source}: d_cond={stored_d_cond!r}, but this project's head condition has "
                             f"{config.d_cond} features; the checkpoint expects another condition encoder.")
        return config


_SUPPORTED: dict[str, object] = {
    "max_t": NUM_TRAIN_TIMESTEPS,
    "positional_encoding": "rope",
    "noise_conditioning": "token",
    "xattn_mode": "kv_from_cond_q_from_x",
    "cond_param": "ours",
    "include_canonicalized_cpf_rotation_in_cond": True,
    "include_hand_positions_cond": False,
    "fourier_enc_freqs": len(FOURIER_FREQUENCIES),
}


def read_config(path: str | Path) -> EgoAlloConfig:
    """Parse model_config.yaml with PyYAML's *safe* loader (never the unsafe or full one).

    Raises:
        UnsafeYamlTagError: any tag but :data:`CONFIG_TAG` (``!!python/object/apply:...``, ``!!python/name:...``,
            unknown ``!tags``); found while parsing, before any Python object is built, so nothing runs.
        ValueError, TypeError: malformed YAML, a document that is not a mapping, unknown or bad fields.
    """
    try:
        values = yaml.load(Path(path).read_text(), Loader=_ConfigLoader)  # a SafeLoader subclass
    except UnsafeYamlTagError as error:
        raise UnsafeYamlTagError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a {type(values).__name__}, expected the mapping of EgoDenoiserConfig fields.")
    return EgoAlloConfig.from_mapping(values, source=path)


# ---------------------------------------------------------------------------------------------
# The folder and the manifest


@dataclass(frozen=True)
class CheckpointFiles:
    """The two files read from EgoAllo's checkpoint folder."""

    config_path: Path
    """``<folder>/model_config.yaml``."""
    weights_path: Path
    """``<folder>/checkpoints_<step>/model.safetensors`` of the largest step."""
    step: int
    """Training step of the chosen checkpoint (the number in its folder name)."""


def find_checkpoint_files(folder: str | Path) -> CheckpointFiles:
    """Locate model_config.yaml and the newest ``checkpoints_<N>/model.safetensors`` (largest N, not mtime).

    ``folder`` is EgoAllo's experiment folder (e.g. ``egoallo_checkpoint_april13/``) or one of its
    ``checkpoints_<N>`` folders (what EgoAllo's own scripts take), whose parent holds the YAML. Only
    those two files are read; accelerate's leftovers beside the weights (optimizer, scheduler, random
    states, some of them pickles) are never opened.

    Raises:
        FileNotFoundError: naming the folder, what it holds and which file is missing.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass EgoAllo's checkpoint folder (holding "
                                f"{CONFIG_FILE} and checkpoints_<N>/{WEIGHTS_FILE}).")
    own = _CHECKPOINT_DIR.fullmatch(folder.name)
    if own is not None and not (folder / CONFIG_FILE).is_file():
        root, step, chosen = folder.parent, int(own.group(1)), folder
    else:
        steps = {int(m.group(1)): p for p in folder.iterdir()
                 if p.is_dir() and (m := _CHECKPOINT_DIR.fullmatch(p.name))}
        if not steps:
            raise FileNotFoundError(f"{folder} has no checkpoints_<N> folder (it holds "
                                    f"{sorted(p.name for p in folder.iterdir())}); pass EgoAllo's unzipped checkpoint "
                                    "folder, e.g. egoallo_checkpoint_april13/.")
        root, step = folder, max(steps)
        chosen = steps[step]
    files = CheckpointFiles(config_path=root / CONFIG_FILE, weights_path=chosen / WEIGHTS_FILE, step=step)
    for path in (files.config_path, files.weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: EgoAllo's checkpoint folder needs {CONFIG_FILE} beside "
                                    f"checkpoints_<N>/{WEIGHTS_FILE} (the newest N is used); pass a complete folder "
                                    "or the checkpoints_<N> folder you want.")
    return files


def expected_shapes(config: EgoAlloConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the checkpoint, as a function of the config (the manifest).

    egoallo-checkpoint.md's table with L = d_latent, F = d_feedforward, N = d_noise_emb, m the
    modality sizes and C = d_cond; for the released config: 222 tensors, 50,447,088 numbers.
    """
    L, FF, N, C, Dh = config.d_latent, config.d_feedforward, config.d_noise_emb, config.d_cond, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    for name, s in modality_slices(config.include_hands).items():
        m = s.stop - s.start
        # encoders: Linear, act, Linear, act, Linear; decoders: Linear, LayerNorm, act, Linear, act, Linear
        for index, shape in ((0, (L, m)), (2, (L, L)), (4, (L, L))):
            shapes |= {f"encoders.{name}.{index}.weight": shape, f"encoders.{name}.{index}.bias": (L,)}
        for index, shape in ((0, (L, L)), (1, (L,)), (3, (L, L)), (5, (m, L))):
            shapes |= {f"decoders.{name}.{index}.weight": shape, f"decoders.{name}.{index}.bias": shape[:1]}
    shapes |= {"latent_from_cond.weight": (L, C), "latent_from_cond.bias": (L,),
               "noise_emb.weight": (config.max_t, N), "noise_emb_token_proj.weight": (L, N)}
    for stream, count in (("encoder_layers", config.encoder_layers), ("decoder_layers", config.decoder_layers)):
        for i in range(count):
            p = f"{stream}.{i}"
            shapes |= {f"{p}.sattn_qkv_proj.weight": (3 * L, L), f"{p}.sattn_out_proj.weight": (L, L),
                       f"{p}.layernorm1.weight": (L,), f"{p}.layernorm1.bias": (L,),
                       f"{p}.layernorm2.weight": (L,), f"{p}.layernorm2.bias": (L,),
                       f"{p}.rotary_emb.freqs": (Dh // 2,),
                       f"{p}.mlp0.weight": (FF, L), f"{p}.mlp0.bias": (FF,),
                       f"{p}.mlp1.weight": (L, FF), f"{p}.mlp1.bias": (L,)}
            if stream == "decoder_layers":
                shapes |= {f"{p}.xattn_kv_proj.weight": (2 * L, L), f"{p}.xattn_q_proj.weight": (L, L),
                           f"{p}.xattn_layernorm.weight": (L,), f"{p}.xattn_layernorm.bias": (L,),
                           f"{p}.xattn_out_proj.weight": (L, L)}
    return shapes


def manifest_numel(config: EgoAlloConfig) -> int:
    """Total numbers in the checkpoint for ``config`` (50,447,088 for the released one)."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def check_tensors(tensors: Mapping[str, Tensor], config: EgoAlloConfig, source: str | Path) -> None:
    """Raise one ValueError naming every missing, unexpected, mis-shaped and non-float tensor."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} is {tuple(v.shape)}, expected {expected[k]}" for k, v in sorted(tensors.items())
             if k in expected and tuple(v.shape) != expected[k]]
    wrong += [f"{k} has dtype {v.dtype}, expected floating point" for k, v in sorted(tensors.items())
              if k in expected and not v.is_floating_point()]
    if missing or unexpected or wrong:
        sizes = ", ".join(f"{f}={getattr(config, f)}" for f in ("d_latent", "d_feedforward", "d_noise_emb", "num_heads",
                                                                "encoder_layers", "decoder_layers", "include_hands"))
        parts = [f"{label} ({len(keys)}): {', '.join(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)) if keys]
        raise ValueError(f"{source} does not match its {CONFIG_FILE} ({sizes}, d_cond={config.d_cond}):\n  "
                         + "\n  ".join(parts) + "\nUse the model_config.yaml saved with these weights; a checkpoint "
                         "of another EgoAllo network version is not supported.")


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
