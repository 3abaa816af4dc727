"""Classifier-free guidance inside the policy: the guided prediction is the policy's output.

Why in the core: with guidance the sampled step is a Gaussian around the *guided* prediction
    out = out_uncond + w (out_cond - out_uncond)        (Ho & Salimans 2022, eq. 6; w = guidance_scale),
so GRPO's log-probabilities, when sampling and when re-scoring, must both be computed from it, on
the same rows in the same network batches, or the on-policy ratio is not 1. The core therefore
builds the guided network call once (:func:`guided_model_fn`) and both ``rollout`` and
``score_step`` use it.

Where the unconditional input comes from: the condition itself. A condition is a dict of tensors
in which ``negative_<key>`` is the unconditional counterpart of ``<key>`` (diffusers' naming:
``negative_prompt_embeds``, ``negative_pooled_prompt_embeds``). Because it travels with the
condition, a micro-batch of rows carries its own unconditional rows, so rollout and re-scoring see
identical inputs whatever the batching.

One network call per micro-batch: the unconditional and conditional halves are stacked as
``[uncond rows; cond rows]`` (2n rows) and split after the call, as diffusers' pipelines do.
With ``guidance_scale == 1`` the unconditional half cancels, so it is not computed at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

NEGATIVE_PREFIX = "negative_"
"""Condition keys starting with this hold the unconditional counterpart of the key without it."""


def check_guidance(cond: Tensor | Mapping[str, Tensor], guidance_scale: float) -> None:
    """Raise unless ``cond`` supports ``guidance_scale``: w >= 1, and for w > 1 a dict condition whose
    every ``negative_<key>`` has its ``<key>`` (same shape) and which holds at least one such pair."""
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 1 (1 = no guidance); fix "
                         "--sampler.guidance-scale")
    if guidance_scale == 1.0:
        return
    if not isinstance(cond, Mapping):
        raise ValueError(f"sampler.guidance_scale={guidance_scale} needs the unconditional input in the condition, "
                         "but the task's encode_condition returns a single tensor; return a dict with "
                         "'<key>' and 'negative_<key>' entries, or pass --sampler.guidance-scale 1")
    pairs = conditional_keys(cond)
    if not pairs:
        raise ValueError(f"sampler.guidance_scale={guidance_scale} needs 'negative_<key>' entries in the condition "
                         f"(got keys {sorted(cond)}); add the unconditional embeddings in the task's "
                         "encode_condition, or pass --sampler.guidance-scale 1")
    for key in pairs:
        if cond[key].shape != cond[NEGATIVE_PREFIX + key].shape:
            raise ValueError(f"condition entry {key!r} has shape {tuple(cond[key].shape)} but "
                             f"{NEGATIVE_PREFIX + key!r} has {tuple(cond[NEGATIVE_PREFIX + key].shape)}; they must "
                             "match (pad the unconditional embedding like the conditional one)")


def conditional_keys(cond: Mapping[str, Tensor]) -> list[str]:
    """Keys of ``cond`` that have a ``negative_`` counterpart."""
    return [key for key in cond if not key.startswith(NEGATIVE_PREFIX) and NEGATIVE_PREFIX + key in cond]


def conditional_part(cond: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
    """The condition without its ``negative_*`` entries (what an unguided call receives)."""
    if isinstance(cond, Tensor):
        return cond
    return {key: value for key, value in cond.items() if not key.startswith(NEGATIVE_PREFIX)}


def stacked_for_guidance(cond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """(2n, ...) per key: unconditional rows first, then conditional rows; unpaired keys are repeated."""
    out = {}
    for key, value in conditional_part(cond).items():
        negative = cond.get(NEGATIVE_PREFIX + key, value)
        out[key] = torch.cat([negative, value])
    return out


def guided_model_fn(predict: Callable[[nn.Module, Tensor, Tensor, object], Tensor], model: nn.Module,
                    guidance_scale: float) -> Callable[[Tensor, Tensor, object], Tensor]:
    """The policy's network call ``(x_t (n, *S), t (n,), cond) -> output (n, *S)`` with guidance w.

    ``predict`` is the task's ``predict(model, x_t, t, cond)``. w = 1: one call on the conditional
    part. w > 1: one call on 2n rows (``[uncond; cond]``), then ``uncond + w (cond - uncond)`` in the
    network's output dtype (as diffusers' pipelines combine them).
    """
    if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
        raise ValueError(f"guidance_scale={guidance_scale} must be >= 1 (1 = no guidance)")

    if guidance_scale == 1.0:
        return lambda x_t, t, cond: predict(model, x_t, t, conditional_part(cond))

    def guided(x_t: Tensor, t: Tensor, cond) -> Tensor:
        check_guidance(cond, guidance_scale)
        out = predict(model, torch.cat([x_t, x_t]), torch.cat([t, t]), stacked_for_guidance(cond))  # (2n, *S)
        uncond, conditional = out.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    return guided
