"""Import a recipe script as a module (recipes are runnable scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str) -> ModuleType:
    """A fresh import of ``recipes/<name>.py``, registered as ``<name>_recipe``.

    Registered in ``sys.modules`` because dataclasses resolve string annotations through it.
    """
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_tiny_prior(path: Path) -> Path:
    """A tiny random demo-layout denoiser (width 32, one encoder and one decoder layer) saved at ``path``,
    seeded so every recipe test starts from the same weights."""
    import dataclasses

    import torch

    from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, save_denoiser

    torch.manual_seed(0)
    save_denoiser(path, MotionDenoiser(dataclasses.replace(DenoiserConfig.demo(), width=32, ff_dim=64,
                                                           num_encoder_layers=1, num_decoder_layers=1)))
    return path
