"""The floor height of an Aria recording's MPS world: from the semi-dense points, else from the head height.

Why a module: the prior needs the floor at z = 0, and the MPS world does not say where it is; the two
estimates (a robust 1-D fit to the lowest semi-dense points, or the wearer's standing eye height below
the median head) and their plausibility check are one concept, step 5 of ``aria.load_recording``.
Heights in metres along the gravity-aligned +Z axis.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tasks.ego_motion.body.body_model import BodyModel
from tasks.ego_motion.body.geometry import (
    HEAD_JOINT,
)
from tasks.ego_motion.data.aria_files import AriaConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FloorEstimate:
    """Height of the floor along the gravity-aligned +Z axis."""

    floor_z_m: float
    """Floor height in the gravity-aligned MPS world (before the shift), metres."""
    method: Literal["semidense_points", "head_height"]
    num_inliers: int
    """Points within the floor band (0 for the head-height fallback)."""
    num_candidates: int
    """Points low enough to be floor (0 for the head-height fallback)."""


def estimate_floor_height(
    point_z_m: Float[Tensor, " P"], cpf_z_m: Float[Tensor, " L"], cfg: AriaConfig
) -> FloorEstimate:
    """The lowest well-supported horizontal surface below the head: a robust 1-D estimate of the floor height.

    Why not the lowest point: SLAM leaves a few points below the floor (reflections, noise); why not
    the densest band: a table top or a bed can hold more points than the floor. Steps, on the heights
    z (+Z up, any origin):
    1. candidates: points more than ``min_eye_height_m`` below the median CPF height;
    2. support n(z_i) = number of candidates within +-``floor_band_m`` of z_i (every point is a
       1-D RANSAC hypothesis, so the search is exhaustive and deterministic);
    3. the floor band is centred on the lowest z_i with n(z_i) >= ``floor_min_support`` x max n and
       >= ``floor_min_points``; the estimate is the median of the points in that band.

    Raises:
        ValueError: no band has enough support (too few points below the head).
    """
    head_z = float(cpf_z_m.median())
    z = torch.sort(point_z_m[point_z_m < head_z - cfg.min_eye_height_m].to(torch.float64)).values  # (P',)
    support = (torch.searchsorted(z, z + cfg.floor_band_m, right=True)
               - torch.searchsorted(z, z - cfg.floor_band_m, right=False))  # (P',)
    needed = max(cfg.floor_min_points, math.ceil(cfg.floor_min_support * (int(support.max()) if len(z) else 0)))
    good = torch.nonzero(support >= needed)
    if len(good) == 0:
        raise ValueError(f"only {len(z)} semi-dense points lie {cfg.min_eye_height_m} m below the median head "
                         f"height and no {2 * cfg.floor_band_m} m band holds {cfg.floor_min_points} of them; "
                         "the floor was not mapped. Pass --aria.no-use-semidense-floor to use the head height.")
    z_band = z[int(good[0])]
    inliers = z[(z - z_band).abs() <= cfg.floor_band_m]
    floor_z = float(inliers.median())
    _warn_if_implausible(head_z - floor_z, "semi-dense points")
    return FloorEstimate(floor_z, "semidense_points", len(inliers), len(z))


def standing_cpf_height_m(body: BodyModel) -> float:
    """CPF height above the soles of the body model's mean shape standing in its zero pose, metres.

    Height = y of (head joint + CPF offset) minus the lowest mesh vertex's y, in the model frame
    (+Y up), betas = 0: 1.59 m for the bundled skeleton model.
    """
    betas = torch.zeros(body.num_betas, dtype=body.J_template.dtype)
    cpf_y = body.shaped_joints(betas)[HEAD_JOINT, 1] + body.T_head_cpf(betas)[1, 3]
    layer = body.smplx_layer
    sole_y = (layer.v_template + torch.einsum("vcb,b->vc", layer.shapedirs, betas))[:, 1].min()
    return float(cpf_y - sole_y)


def floor_from_head_height(cpf_z_m: Float[Tensor, " L"], standing_height_m: float) -> FloorEstimate:
    """Fallback without semi-dense points: floor = median CPF height - the standing CPF height.

    Assumes the wearer stands or walks for at least half of the recording and has the standing
    eye height given (sitting most of the time puts the floor too high, a taller wearer too low:
    expect errors of 0.1-0.2 m; the bundled test clips' median CPF heights span 1.44-1.80 m).
    """
    floor_z = float(cpf_z_m.median()) - standing_height_m
    logger.warning("no semi-dense points used: floor set %.2f m below the median head height (assumes a standing "
                   "wearer); pass the MPS semidense_points.csv.gz for a measured floor", standing_height_m)
    return FloorEstimate(floor_z, "head_height", 0, 0)


def _warn_if_implausible(median_cpf_height_m: float, source: str) -> None:
    if not 1.0 <= median_cpf_height_m <= 2.1:
        logger.warning("floor from %s puts the median head height %.2f m above it (a standing adult: 1.4-1.8 m); "
                       "check the floor before trusting the body's height", source, median_cpf_height_m)
