"""EgoAllo's released checkpoint folder, read safely and strictly: its YAML config, its files, its manifest.

Why apart from the network (``egoallo_checkpoint.py``): reading a folder someone downloaded is where the
safety rules live (only the one known YAML tag is constructed, every other tag is refused; the weights
must match the 222-key manifest :func:`expected_shapes` exactly, shape by shape), and they hold whatever
network is built from the config. The folder layout, the manifest and the timestep numbering are
described in docs/egoallo_checkpoint.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import Tensor

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
