"""A fixed probe set: the same conditions and the same noises at every checkpoint, compared in pairs.

Why: the mean training reward of an iteration mostly reflects *which* conditions were drawn (its
per-iteration spread is larger than the effect GRPO has), so "first iterations vs last iterations"
cannot resolve a change. A probe set fixes C conditions per split and M noises per condition; every
evaluation runs the very same (condition, x_T, step noise) tuples (common random numbers: the
generator is re-seeded each time), so the difference between two checkpoints on one tuple is the
training and nothing else. Differences are averaged per condition first (the M draws of a condition
are not independent of each other), then a 95 % t-interval is taken over the C conditions.

Shapes: C conditions, M noises per condition, N = C x M samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import ProbeConfig
from diffgrpo.guidance import guided_model_fn
from diffgrpo.modes import evaluation_mode
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.rollout import rollout
from diffgrpo.task import Task, batch_to, cond_device, repeat_batch


def probe_indices(num_examples: int, count: int, seed: int, split: str) -> Tensor:
    """(C,) sorted example indices: the first ``count`` of a permutation seeded by (seed, split)."""
    order = torch.randperm(num_examples, generator=make_generator(seed, "probe_conditions", split))
    return order[: min(count, num_examples)].sort().values


@torch.no_grad()
def evaluate_probe(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    cfg: ProbeConfig,
    *,
    rewards: RewardSet | None = None,
    micro_batch_size: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Every sub-reward (``reward/<split>/<name>``), their weighted sum (``reward/<split>/total``) and
    every task metric (``metric/<split>/<name>``) on the probe set, shaped (C, M) per split (C may be
    smaller for a split with fewer than ``conditions_per_split`` examples).

    Deterministic: two calls with equal weights return equal tensors (same conditions, x_T and step
    noise). The model is put in eval mode and restored.
    """
    with evaluation_mode(model):
        out: dict[str, Tensor] = {}
        for split in cfg.splits:
            indices = probe_indices(task.num_examples(split), cfg.conditions_per_split, cfg.seed, split)
            num_conditions, num_noises = len(indices), cfg.noises_per_condition
            batch = repeat_batch(batch_to(task.load_examples(split, indices), device), num_noises)
            cond = task.encode_condition(batch)
            pair_ids = torch.arange(num_conditions * num_noises, device=cond_device(cond))  # each (c, m) its own x_T
            generator = make_generator(cfg.seed, "probe_noise", split, device=device)
            model_fn = guided_model_fn(task.predict, model, chain.sampler.guidance_scale)
            trajectory = rollout(model_fn, chain, cond, pair_ids, generator=generator,
                                 micro_batch_size=micro_batch_size, x0_pred_steps=())
            decoded = task.decode(trajectory.samples, batch)
            if rewards is not None:
                scored = rewards(decoded, batch)
                total = sum(scored.weights[name] * value.double() for name, value in scored.components.items())
                for name, value in {**scored.components, "total": total}.items():
                    out[f"reward/{split}/{name}"] = value.float().reshape(num_conditions, num_noises).cpu()
            for name, value in task.evaluate(decoded, batch).items():
                out[f"metric/{split}/{name}"] = value.float().reshape(num_conditions, num_noises).cpu()
    return out


@dataclass(frozen=True)
class PairedDifference:
    """mean(current - baseline) over conditions with its 95 % t-interval."""

    mean: float
    ci_low: float
    ci_high: float
    num_conditions: int

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom.

    Cornish-Fisher expansion around the normal quantile z = 1.959964 (Abramowitz & Stegun 26.7.5),
    within 4e-3 of the exact value for dof >= 3 and 1e-4 for dof >= 10; tabulated values for dof 1 and 2.
    """
    if dof < 1:
        raise ValueError(f"dof={dof} must be >= 1")
    if dof <= 2:
        return (12.7062, 4.3027)[dof - 1]
    z, n = 1.959963984540054, float(dof)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / n + g2 / n**2 + g3 / n**3 + g4 / n**4


def paired_difference(current: Float[Tensor, "C M"], baseline: Float[Tensor, "C M"]) -> PairedDifference:
    """Paired difference of two probe evaluations of one quantity (same conditions and noises).

    d_c = mean_m (current - baseline)[c, m]; mean = mean_c d_c; interval = mean +- t_{0.975, C-1} sd(d) / sqrt(C).
    """
    if current.shape != baseline.shape or current.ndim != 2 or current.shape[0] < 2:
        raise ValueError(f"current {tuple(current.shape)} and baseline {tuple(baseline.shape)} must be equal (C, M) "
                         "shapes from one probe set, with C >= 2")
    per_condition = (current.double() - baseline.double()).mean(dim=1)  # (C,)
    num = per_condition.shape[0]
    mean = float(per_condition.mean())
    half = t_quantile_975(num - 1) * float(per_condition.std(correction=1)) / math.sqrt(num)
    return PairedDifference(mean=mean, ci_low=mean - half, ci_high=mean + half, num_conditions=num)


def probe_logs(current: Mapping[str, Tensor], baseline: Mapping[str, Tensor] | None) -> dict[str, float]:
    """Flat scalars for the history: ``probe/<key>`` means, and against ``baseline`` the paired
    ``probe_diff/<key>`` with ``.../ci_low`` and ``.../ci_high``."""
    logs: dict[str, float] = {}
    for key, value in current.items():
        logs[f"probe/{key}"] = float(value.double().mean())
        if baseline is not None:
            diff = paired_difference(value, baseline[key])
            logs[f"probe_diff/{key}"] = diff.mean
            logs[f"probe_diff/{key}/ci_low"] = diff.ci_low
            logs[f"probe_diff/{key}/ci_high"] = diff.ci_high
    return logs
