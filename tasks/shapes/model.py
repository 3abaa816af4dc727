"""The shapes denoiser: a tiny diffusers ``UNet2DModel`` conditioned through coordinate maps.

Why coordinate maps rather than an embedding added to the time embedding: a UNet is translation
equivariant, so a global vector (cx, cy, r) has to be turned into "where" by the network itself,
which takes many steps to learn on CPU. Giving the condition as three extra input channels that
already live on the pixel grid -- the offsets of each pixel centre from the requested centre and
the requested radius, see :func:`tasks.shapes.task.condition_maps` -- leaves the network only a
local decision (is this pixel inside?), which a 0.6 M-parameter UNet learns in a few minutes on
two CPU cores. The input is therefore ``cat([x_t, maps], dim=1)``: (N, 1 + 3, 16, 16).

The network predicts the flow-matching velocity v = noise - x0 at timestep t = sigma * 1000.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import UNet2DModel

CONDITION_CHANNELS = 3
"""Channels of the condition maps (dx, dy, r), concatenated to the 1-channel x_t."""


@dataclass(frozen=True)
class ShapesModelConfig:
    """Size of the shapes UNet (two resolution levels: 16x16 and 8x8)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    """Channels per resolution level; one down/up block each. Every entry must be divisible by
    norm_num_groups."""
    layers_per_block: int = 1
    """ResNet layers per down block (up blocks get one more, as in diffusers)."""
    norm_num_groups: int = 8
    """GroupNorm groups."""
    use_mid_block: bool = True
    """Include the bottleneck ResNet block (without attention) at the lowest resolution."""

    def __post_init__(self) -> None:
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; pass at least one level, "
                             "e.g. --model.block-out-channels 32 64")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}; change --model.norm-num-groups "
                             "or the channel counts.")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")


def build_model(cfg: ShapesModelConfig, image_size_px: int = 16, seed: int | None = None) -> UNet2DModel:
    """A freshly initialised UNet taking (N, 4, S, S) inputs and returning (N, 1, S, S) velocities.

    Each extra level halves the resolution, so ``image_size_px`` must be divisible by
    2 ** (len(block_out_channels) - 1). ``seed`` makes the initial weights reproducible without
    touching the global RNG (diffusers initialises from it and takes no generator); None draws
    them from the global RNG as usual.
    """
    levels = len(cfg.block_out_channels)
    if image_size_px % (2 ** (levels - 1)):
        raise ValueError(f"image_size_px={image_size_px} cannot be halved {levels - 1} times; use fewer "
                         "--model.block-out-channels levels or a power-of-two image size.")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_model(cfg, image_size_px)
    return UNet2DModel(
        sample_size=image_size_px,
        in_channels=1 + CONDITION_CHANNELS,
        out_channels=1,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        mid_block_type="UNetMidBlock2D" if cfg.use_mid_block else None,
        add_attention=False,
        norm_num_groups=cfg.norm_num_groups,
    )


TASK_CONFIG_FILE = "shapes_task.json"
"""Written beside the weights: the task settings the prior was trained for (image size, radii)."""


def save_prior(model: UNet2DModel, task_config: object, output_dir: str | Path) -> Path:
    """Write the UNet (config.json + diffusion_pytorch_model.safetensors) and the task config.

    ``task_config`` is a :class:`tasks.shapes.task.ShapesTaskConfig` (typed loosely here to keep
    imports one-way: task.py does not import the model and vice versa).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / TASK_CONFIG_FILE).write_text(json.dumps(asdict(task_config), indent=2))
    return output_dir


def load_prior(output_dir: str | Path) -> tuple[UNet2DModel, dict]:
    """The UNet saved by :func:`save_prior` and its task config as a dict of keyword arguments.

    Build the matching task with ``ShapesTask(ShapesTaskConfig(**kwargs))`` (the JSON list of
    radii is turned back into a tuple here).
    """
    output_dir = Path(output_dir)
    if not (output_dir / "config.json").exists():
        raise FileNotFoundError(f"no shapes prior in {output_dir} (config.json missing); train one with "
                                f"`python recipes/pretrain_shapes.py --output-dir {output_dir}`.")
    model = UNet2DModel.from_pretrained(output_dir)
    task_kwargs = json.loads((output_dir / TASK_CONFIG_FILE).read_text())
    if "radius_range_px" in task_kwargs:
        task_kwargs["radius_range_px"] = tuple(task_kwargs["radius_range_px"])
    return model, task_kwargs
