"""Scores of a drawn disc against the requested one: overlap, position and size.

Why soft masks: a sample is an image in [-1, 1]; mapping it to a coverage in [0, 1] (no
threshold) keeps every reward a continuous function of the sample, and the weighted Jaccard
index sum(min) / sum(max) equals 1 exactly when the drawn coverage equals the requested one,
anti-aliased edge included (the product form sum(a b) / sum(a + b - a b) would not).

Pixel (row i, column j) has its centre at x = j + 0.5, y = i + 0.5 (see ``tasks.shapes.task``).
Masks are (N, S, S) in [0, 1]; every score is (N,).

Registered rewards (``diffgrpo.rewards`` signature ``reward(samples, batch)``, where ``samples`` is
what ``ShapesTask.decode`` returns and ``batch`` holds the requested disc as ``target``):
- ``shapes_iou``: the soft IoU, in [0, 1].
- ``shapes_disc``: ``overlap`` (soft IoU), ``position`` (minus the centroid distance in pixels) and
  ``size`` (minus the relative area error): three scales, so per-sub-reward normalisation matters.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from diffgrpo.rewards import Reward, register_reward

_EPS = 1e-6


def image_to_mask(image: Tensor) -> Tensor:
    """Coverage (N, S, S) in [0, 1] of images (N, 1, S, S) in [-1, 1]: (image + 1) / 2, clamped."""
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"expected images (N, 1, S, S), got shape {tuple(image.shape)}")
    return ((image[:, 0].float() + 1.0) / 2.0).clamp(0.0, 1.0)


def soft_iou(mask: Tensor, target: Tensor) -> Tensor:
    """Weighted Jaccard index sum(min(m, t)) / sum(max(m, t)) per sample, in [0, 1].

    1 for identical masks, 0 for disjoint ones; 0 (not NaN) when both masks are empty.
    """
    _check_masks(mask, target)
    intersection = torch.minimum(mask, target).sum(dim=(-2, -1))  # (N,)
    union = torch.maximum(mask, target).sum(dim=(-2, -1))  # (N,)
    return intersection / union.clamp_min(_EPS)


def mask_area_px2(mask: Tensor) -> Tensor:
    """Area (N,) in square pixels: the summed coverage."""
    return mask.sum(dim=(-2, -1))


def mask_centroid_px(mask: Tensor) -> Tensor:
    """Coverage-weighted centre (N, 2) = (x, y) in pixels.

    An empty mask has no centre; its centroid is taken at the origin (0, 0), the image's
    top-left corner, so that drawing nothing is penalised by the position score instead of
    producing NaN.
    """
    size = mask.shape[-1]
    coords = torch.arange(size, device=mask.device, dtype=mask.dtype) + 0.5  # (S,)
    area = mask_area_px2(mask).clamp_min(_EPS)  # (N,)
    x = (mask.sum(dim=-2) * coords).sum(dim=-1) / area  # column marginal . x
    y = (mask.sum(dim=-1) * coords).sum(dim=-1) / area  # row marginal . y
    return torch.stack([x, y], dim=-1)


def centroid_error_px(mask: Tensor, target: Tensor) -> Tensor:
    """Euclidean distance (N,) in pixels between the centroids of ``mask`` and ``target``."""
    _check_masks(mask, target)
    return torch.linalg.vector_norm(mask_centroid_px(mask) - mask_centroid_px(target), dim=-1)


def relative_area_error(mask: Tensor, target: Tensor) -> Tensor:
    """|area(mask) - area(target)| / area(target) per sample (N,), dimensionless."""
    _check_masks(mask, target)
    target_area = mask_area_px2(target)
    return (mask_area_px2(mask) - target_area).abs() / target_area.clamp_min(_EPS)


def _masks(samples: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(drawn, requested) masks (N, S, S) from decoded samples and the batch's target images."""
    if "mask" not in samples or "target" not in batch:
        raise KeyError("shapes rewards read samples['mask'] (from ShapesTask.decode) and batch['target']; "
                       f"got sample keys {sorted(samples)} and batch keys {sorted(batch)}.")
    return samples["mask"], image_to_mask(batch["target"])


@register_reward("shapes_iou")
def shapes_iou() -> Reward:
    """R = soft IoU of the drawn disc with the requested one, in [0, 1] (1 = exact)."""

    def reward(samples: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        return soft_iou(*_masks(samples, batch))

    return reward


@register_reward("shapes_disc")
def shapes_disc() -> Reward:
    """Sub-rewards overlap (soft IoU), position (-centroid error, px) and size (-relative area
    error); each is 0 at best except overlap, whose best is 1."""

    def reward(samples: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mask, target = _masks(samples, batch)
        return {
            "overlap": soft_iou(mask, target),
            "position": -centroid_error_px(mask, target),
            "size": -relative_area_error(mask, target),
        }

    return reward


def _check_masks(mask: Tensor, target: Tensor) -> None:
    if mask.shape != target.shape or mask.ndim != 3:
        raise ValueError(f"masks must both be (N, S, S); got {tuple(mask.shape)} and {tuple(target.shape)}. "
                         "Decode images with image_to_mask first.")
