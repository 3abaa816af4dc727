"""A tiny ego-motion prior for the recipe tests (seconds on a CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, save_denoiser


def write_tiny_prior(path: Path) -> Path:
    """A tiny random demo-layout denoiser (width 32, one encoder and one decoder layer) saved at ``path``,
    seeded so every recipe test starts from the same weights."""
    torch.manual_seed(0)
    save_denoiser(path, MotionDenoiser(dataclasses.replace(DenoiserConfig.demo(), width=32, ff_dim=64,
                                                           num_encoder_layers=1, num_decoder_layers=1)))
    return path
