"""Group-relative advantages from one or several sub-rewards, with collapse diagnostics.

Why: GRPO replaces a learned value function by the statistics of G samples that share a
condition: A_i = (R_i - mean_group) / (std_group + eps). With several sub-rewards the paper
normalises each one within the group and sums (MotionGRPO Algorithm 1 line 6; docs/ego_motion_grpo.md):
A_{i,k} = (R_{i,k} - mean_k) / (std_k + eps), A_i = sum_k w_k A_{i,k}.
When the group's samples barely differ (std -> 0) the advantages carry no signal, so such
groups are detected, counted and handled by an explicit policy instead of producing noise or NaN.
Group statistics are computed in float64: in float32 the mean of six equal rewards of -208.66 is off
by an ulp, which turns "no signal" into a std of 1.5e-5 and advantages of +0.13.

Groups come from explicit integer ids (never from the condition's content); they may have
different sizes and the ids need not be contiguous. Standard deviations are population
standard deviations (divide by the group size n, not n - 1): a single-member group has std 0
instead of NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from typing_extensions import assert_never


@dataclass(frozen=True)
class AdvantageConfig:
    """How sub-rewards become one advantage per sample."""

    combine: Literal["normalize_then_sum", "sum_then_normalize"] = "normalize_then_sum"
    """normalize_then_sum: A = sum_k w_k (R_k - mean_k) / (scale_k + eps) (the paper's choice);
    sum_then_normalize: R = sum_k w_k R_k, then A = (R - mean) / (scale + eps)."""
    std_scope: Literal["group", "batch", "none"] = "group"
    """scale = std within the group, std over the whole batch, or 1 with no eps (plain R - mean)."""
    eps: float = 1e-4
    """Added to the std scale; > 0 so a zero std never divides by zero."""
    clip: float | None = None
    """Clamp the final advantage to [-clip, clip]; None keeps it unbounded."""
    zero_std_threshold: float = 1e-6
    """Relative: a (sub-)reward is 'zero-std' in a group when std_g <= zero_std_threshold * max_g |R|,
    and always when all its values in the group are equal (so 0 flags exact ties only). Relative
    because float32 rewards only resolve differences of ~1.2e-7 * |R|: the default 1e-6 (about 8
    float32 ulps) treats rounding-level spread at any reward magnitude as no signal. Must be < 1
    (std_g <= max_g |R| always, so 1 would flag every group)."""
    zero_std_policy: Literal["keep", "drop", "mask"] = "keep"
    """keep: use the formula as is (small, ~0, advantages in collapsed groups).
    mask: zero-std terms are set to exactly 0 (per sub-reward for normalize_then_sum, the whole
    advantage for sum_then_normalize); the samples still enter the loss mean (mask True).
    drop: as mask, and samples of collapsed groups (every sub-reward zero-std for
    normalize_then_sum, the summed reward zero-std for sum_then_normalize) get mask False, so the
    loss averages over informative samples only."""
    weights: Mapping[str, float] | None = None
    """Weight per sub-reward name (RewardSet.weights is the one home for them); None: all 1.
    When given, its keys must equal the sub-reward names."""

    def __post_init__(self) -> None:
        if self.combine not in ("normalize_then_sum", "sum_then_normalize"):
            raise ValueError(
                f"combine={self.combine!r}; expected 'normalize_then_sum' or 'sum_then_normalize'"
            )
        if self.std_scope not in ("group", "batch", "none"):
            raise ValueError(f"std_scope={self.std_scope!r}; expected 'group', 'batch' or 'none'")
        if self.zero_std_policy not in ("keep", "drop", "mask"):
            raise ValueError(f"zero_std_policy={self.zero_std_policy!r}; expected 'keep', 'drop' or 'mask'")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r} must be finite and > 0 so zero-std groups stay finite")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip={self.clip!r} must be None or a finite value > 0")
        if not (math.isfinite(self.zero_std_threshold) and 0 <= self.zero_std_threshold < 1):
            raise ValueError(
                f"zero_std_threshold={self.zero_std_threshold!r} must be in [0, 1): it is relative to the "
                "group's largest |reward| (e.g. 1e-6), not an absolute std"
            )
        if self.weights is not None:
            bad = {k: w for k, w in self.weights.items() if not math.isfinite(w)}
            if bad:
                raise ValueError(f"weights {bad} must be finite; fix AdvantageConfig.weights")


@dataclass(frozen=True)
class AdvantageResult:
    """Advantages, the samples that enter the loss, and scalar diagnostics for the logs."""

    advantages: Float[Tensor, " N"]
    mask: Bool[Tensor, " N"]
    """True for samples that enter the loss (False only under zero_std_policy='drop')."""
    diagnostics: dict[str, float] = field(default_factory=dict)
    """zero_std_frac (overall) and zero_std_frac/<name>: fraction of groups that collapsed (see
    AdvantageConfig.zero_std_threshold);
    group_std/<name>: mean within-group std; reward_mean/<name>: raw mean; adv_mean, adv_std:
    over samples with mask True; kept_frac: fraction of samples with mask True; num_groups."""


def _group_index(group_ids: Tensor, n: int) -> tuple[Tensor, Tensor, int]:
    """Dense group index (N,) in [0, G), member counts (G,) and G."""
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},) like the rewards")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts, counts.numel()


def _group_mean_std(values: Tensor, index: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean and population std (G,) of values (N,), by scatter-add (call it in float64)."""
    num_groups = counts.numel()
    sums = values.new_zeros(num_groups).index_add_(0, index, values)
    mean = sums / counts
    centred = values - mean[index]
    var = values.new_zeros(num_groups).index_add_(0, index, centred * centred) / counts
    return mean, var.sqrt()


def _collapsed(values: Tensor, std: Tensor, index: Tensor, num_groups: int, rtol: float) -> Tensor:
    """(G,) bool: std_g <= rtol * max_g |R|, or all of the group's values equal (whatever rtol)."""
    fill = values.new_full((num_groups,), math.inf)
    group_max = fill.scatter_reduce(0, index, values, "amax", include_self=False)
    group_min = fill.scatter_reduce(0, index, values, "amin", include_self=False)
    scale = torch.maximum(group_max.abs(), group_min.abs())
    return (group_max == group_min) | (std <= rtol * scale)


def _normalise(values: Tensor, index: Tensor, counts: Tensor, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """(R - group mean) / (scale + eps) per sample, and the within-group std (G,)."""
    mean, std = _group_mean_std(values, index, counts)
    centred = values - mean[index]
    if cfg.std_scope == "group":
        return centred / (std[index] + cfg.eps), std
    if cfg.std_scope == "batch":
        return centred / (values.std(correction=0) + cfg.eps), std
    if cfg.std_scope == "none":
        return centred, std
    assert_never(cfg.std_scope)


def compute_advantages(
    rewards: Mapping[str, Float[Tensor, " N"]], group_ids: Int[Tensor, " N"], cfg: AdvantageConfig
) -> AdvantageResult:
    """Group-normalised advantages (N,) from named sub-rewards (N,) each; see AdvantageConfig."""
    if not rewards:
        raise ValueError("rewards is empty; pass at least one named sub-reward tensor of shape (N,)")
    names = list(rewards)
    if not isinstance(group_ids, Tensor) or group_ids.ndim != 1:
        got = tuple(group_ids.shape) if isinstance(group_ids, Tensor) else type(group_ids).__name__
        raise ValueError(f"group_ids must be a 1-D integer tensor (N,), got {got}")
    n = group_ids.shape[0]
    for name, value in rewards.items():
        if not isinstance(value, Tensor) or value.shape != (n,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"sub-reward {name!r} has shape {shape}, expected ({n},) to match group_ids")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"sub-reward {name!r} contains NaN or inf; fix the reward function")
    if cfg.weights is None:
        weights = dict.fromkeys(names, 1.0)
    else:
        if set(cfg.weights) != set(names):
            raise ValueError(
                f"AdvantageConfig.weights has keys {sorted(cfg.weights)} but the sub-rewards are "
                f"{sorted(names)}; pass RewardSet's weights (or None for all 1)"
            )
        weights = {name: float(cfg.weights[name]) for name in names}
    index, counts, num_groups = _group_index(group_ids, n)
    first = rewards[names[0]]
    out_dtype = torch.promote_types(first.dtype, torch.float32)  # what the advantages are returned in
    values = {name: rewards[name].to(torch.float64) for name in names}  # statistics in float64
    counts = counts.to(torch.float64)
    rtol = cfg.zero_std_threshold

    diagnostics: dict[str, float] = {"num_groups": float(num_groups)}
    group_std = {name: _group_mean_std(values[name], index, counts)[1] for name in names}
    zero_std = {
        name: _collapsed(values[name], std, index, num_groups, rtol) for name, std in group_std.items()
    }
    if cfg.combine == "normalize_then_sum":
        advantages = torch.zeros(n, dtype=torch.float64, device=first.device)
        for name in names:
            adv_k = _normalise(values[name], index, counts, cfg)[0]
            if cfg.zero_std_policy != "keep":
                adv_k = adv_k.masked_fill(zero_std[name][index], 0.0)
            advantages += weights[name] * adv_k
        collapsed = torch.stack(list(zero_std.values())).all(dim=0)
    elif cfg.combine == "sum_then_normalize":
        total = sum(weights[name] * values[name] for name in names)
        advantages, std_total = _normalise(total, index, counts, cfg)
        collapsed = _collapsed(total, std_total, index, num_groups, rtol)
        if cfg.zero_std_policy != "keep":
            advantages = advantages.masked_fill(collapsed[index], 0.0)
        diagnostics["group_std/total"] = float(std_total.mean())
    else:
        assert_never(cfg.combine)

    if cfg.clip is not None:
        advantages = advantages.clamp(-cfg.clip, cfg.clip)
    advantages = advantages.to(out_dtype)
    if cfg.zero_std_policy == "drop":
        mask = ~collapsed[index]
    else:
        mask = torch.ones(n, dtype=torch.bool, device=first.device)

    for name in names:
        diagnostics[f"zero_std_frac/{name}"] = float(zero_std[name].double().mean())
        diagnostics[f"group_std/{name}"] = float(group_std[name].mean())
        diagnostics[f"reward_mean/{name}"] = float(values[name].mean())
    diagnostics["zero_std_frac"] = float(collapsed.double().mean())
    kept = advantages[mask]
    diagnostics["kept_frac"] = float(mask.double().mean())
    diagnostics["adv_mean"] = float(kept.mean()) if kept.numel() else 0.0
    diagnostics["adv_std"] = float(kept.std(correction=0)) if kept.numel() else 0.0
    return AdvantageResult(advantages=advantages, mask=mask, diagnostics=diagnostics)


def group_diversity(samples: Float[Tensor, "N ..."], group_ids: Int[Tensor, " N"]) -> Float[Tensor, " G"]:
    """Root-mean-square pairwise L2 distance between the members of each group.

    Why: the paper's failure mode is groups of near-identical samples; this logs how far apart
    the G samples are, in the samples' own units. For a group of n members with mean m,
    mean_{i != j} ||x_i - x_j||^2 = 2 / (n - 1) * sum_i ||x_i - m||^2, so no N x N distance
    matrix is formed. Returns one value per group, ordered by sorted group id; 0 for groups
    with a single member. Computed in float64 (a float32 group mean is off by an ulp, so identical
    samples would show a spurious spread) and returned in the samples' float dtype (float32 at least).
    """
    if samples.ndim < 1:
        raise ValueError("samples must have a leading sample axis N")
    n = samples.shape[0]
    index, counts, num_groups = _group_index(group_ids, n)
    out_dtype = torch.promote_types(samples.dtype, torch.float32)
    flat = samples.reshape(n, -1).to(torch.float64)
    counts = counts.to(flat.dtype)
    sums = flat.new_zeros(num_groups, flat.shape[1]).index_add_(0, index, flat)
    centred = flat - (sums / counts[:, None])[index]
    sq = flat.new_zeros(num_groups).index_add_(0, index, (centred * centred).sum(dim=1))
    return (2.0 * sq / (counts - 1).clamp(min=1)).sqrt().to(out_dtype)
