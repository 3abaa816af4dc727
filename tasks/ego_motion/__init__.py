"""Egocentric full-body motion recovery from a headset's head trajectory (MotionGRPO on an EgoAllo-style prior).

The wing stacks in layers, each importing only from those below it (docs/architecture.md has the
generated table; ``tests/test_architecture.py`` enforces it): ``body`` (SMPL-H geometry and model, the
shared constants ``NUM_BETAS``, ``FOOT_JOINTS``, ``NUM_METRIC_JOINTS``) -> ``data`` (mocap to AMASS-layout
clips to training windows at ``TARGET_FPS``; Aria recordings) -> ``evaluation`` (metrics, rendering) ->
``model`` (condition encoding, motion packing, the denoiser, EgoAllo's checkpoints, the prior's loss) ->
``task`` (the ``Task`` adapter and its sampling chains) -> ``sampling`` (windows, stitched sequences,
held-out evaluation, test-time optimisation) -> ``physics`` (the MuJoCo evaluator) -> ``rewards`` (the
registered rewards, the learned perceptual model) -> the jobs ``grpo`` (MotionGRPO) and ``pretrain``.

The public face below names what a user of the wing needs; each name is imported from its home on
first use, so importing one submodule does not load the whole wing. Import
``tasks.ego_motion.rewards.registered`` to register the ``ego_*`` and ``physics_*`` rewards.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "NUM_BETAS": "tasks.ego_motion.body.geometry",
    "FOOT_JOINTS": "tasks.ego_motion.body.geometry",
    "NUM_METRIC_JOINTS": "tasks.ego_motion.body.geometry",
    "BodyModel": "tasks.ego_motion.body.body_model",
    "load_body_model": "tasks.ego_motion.body.body_model",
    "TARGET_FPS": "tasks.ego_motion.data.amass",
    "WindowConfig": "tasks.ego_motion.data.windows",
    "load_windows": "tasks.ego_motion.data.windows",
    "DenoiserConfig": "tasks.ego_motion.model.network",
    "load_denoiser": "tasks.ego_motion.model.network",
    "EgoMotionTask": "tasks.ego_motion.task",
    "EgoMotionTaskConfig": "tasks.ego_motion.task",
    "DEMO_PRIOR_PATH": "tasks.ego_motion.task",
    "METRIC_UNITS": "tasks.ego_motion.task",
    "decode_motion": "tasks.ego_motion.task",
    "sample_motion": "tasks.ego_motion.sampling.sampler",
    "sample_sequence": "tasks.ego_motion.sampling.sampler",
    "evaluate_windows": "tasks.ego_motion.sampling.sampler",
    "StitchConfig": "tasks.ego_motion.sampling.sampler",
    "TTOConfig": "tasks.ego_motion.sampling.tto",
    "PhysicsEvaluator": "tasks.ego_motion.physics.evaluator",
    "PerceptualTrainer": "tasks.ego_motion.rewards.perceptual",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """The public name ``name``, imported from its home module (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tasks.ego_motion' has no attribute {name!r}; its public names: {__all__}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
