"""The two halves of a GRPO iteration as plain functions: collect, then update.

``collect`` is Algorithm 1's sampling half: expand each condition into a group, perturb the
condition per member, roll out under no_grad with group-shared initial noise, decode, score,
and turn rewards into group-relative advantages. ``policy_update`` is the learning half:
re-score the recorded transitions under the current weights and take optimiser steps on the
GRPO surrogate, accumulating gradients over micro-batches and steps.

Both run the network on identical micro-batches (``GRPOConfig.micro_batch_size``) in the same
mode and precision, which is what makes the first update's importance ratios exactly 1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffgrpo.advantages import AdvantageResult, compute_advantages, group_diversity
from diffgrpo.config import GRPOConfig
from diffgrpo.loss import gaussian_step_kl, grpo_loss, select_steps
from diffgrpo.perturb import get_perturber
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import Trajectory, group_ids_for, rollout, score_step
from diffgrpo.task import Batch, Task, repeat_batch


@dataclass(frozen=True)
class RolloutBatch:
    """Everything one iteration's update and logs need."""

    trajectory: Trajectory
    batch: Batch
    """The expanded (B*G rows), perturbed batch the chains were conditioned on."""
    decoded: Mapping[str, Tensor]
    rewards: dict[str, Tensor]
    """Named sub-rewards, (N,) each."""
    advantages: AdvantageResult


def make_perturber(cfg: GRPOConfig):
    """The configured condition perturber from the registry."""
    p = cfg.perturb
    if p.name == "perlin":
        return get_perturber("perlin", scale=p.scale, frequency=p.frequency, octaves=p.octaves)
    if p.name == "none":
        return get_perturber("none")
    return get_perturber(p.name, scale=p.scale)


def model_fn_for(task: Task, model: nn.Module):
    """Bind the task's network call to a model: (x_t, t, cond) -> output."""
    return lambda x_t, t, cond: task.predict(model, x_t, t, cond)


@torch.no_grad()
def collect(
    task: Task,
    model: nn.Module,
    scheduler,
    batch: Batch,
    *,
    cfg: GRPOConfig,
    rewards: RewardSet,
    perturber,
    generator: torch.Generator,
    group_id_offset: int,
    autocast=contextlib.nullcontext,
) -> RolloutBatch:
    """Alg. 1 lines 2-6 for one batch of B conditions: perturb, sample G each, score, normalise."""
    num_conditions = next(iter(batch.values())).shape[0]
    expanded = repeat_batch(batch, cfg.group_size)  # (B*G, ...)
    raw = task.raw_condition(expanded)
    if not bool(torch.isfinite(raw).all()):
        bad = (~torch.isfinite(raw)).flatten(1).any(1).nonzero().flatten() // cfg.group_size
        raise ValueError(f"the raw condition of batch rows {sorted(set(bad.tolist()))} holds NaN or inf; "
                         "fix or drop those examples in the task's load_examples")
    expanded = task.with_raw_condition(expanded, perturber(raw, generator))
    cond = task.encode_condition(expanded)
    group_ids = group_ids_for(num_conditions, cfg.group_size, offset=group_id_offset, device=cond.device)
    model.eval()  # the policy is one fixed function in rollout and update: no dropout/BN noise
    with autocast():
        trajectory = rollout(model_fn_for(task, model), scheduler, cond, group_ids, task.sampling_timesteps(),
                             task.sample_shape, generator=generator, sampler=cfg.sampler,
                             micro_batch_size=cfg.micro_batch_size)
    decoded = task.decode(trajectory.samples, expanded)
    scored = rewards(decoded, expanded)
    advantages = compute_advantages(scored.components, group_ids,
                                    dataclasses.replace(cfg.advantages, weights=scored.weights))
    return RolloutBatch(trajectory, expanded, decoded, scored.components, advantages)


def diversity(rollout_batch: RolloutBatch) -> float:
    """Mean intra-group spread of the final samples (see ``advantages.group_diversity``)."""
    traj = rollout_batch.trajectory
    return float(group_diversity(traj.samples.float(), traj.group_ids).mean())


def frozen_copy(model: nn.Module) -> nn.Module:
    """A gradient-free copy of the model, e.g. the reference policy for the KL term."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def policy_update(
    task: Task,
    model: nn.Module,
    scheduler,
    data: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    *,
    cfg: GRPOConfig,
    generator: torch.Generator,
    accelerator,
    lr_scheduler=None,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Alg. 1 lines 7-9: ``cfg.inner_epochs`` optimiser steps on the GRPO surrogate.

    Each optimiser step accumulates gradients over every (micro-batch, trained step) pair;
    DDP gradient synchronisation happens only on the last backward of the step.
    """
    traj = data.trajectory
    n = traj.states.shape[0]
    trained = select_steps(traj.num_steps, cfg.steps.mode, fraction=cfg.steps.fraction, window=cfg.steps.window,
                           generator=generator, is_stochastic=traj.is_stochastic.cpu())
    steps = trained.nonzero().flatten().tolist()
    if not steps:
        raise ValueError("no stochastic step selected for training: widen --steps.window or raise "
                         "--steps.fraction, and check that sampler.eta > 0")
    adv, keep = data.advantages.advantages, data.advantages.mask
    kept_total = max(int(keep.sum()), 1)
    rows_list = [slice(i, min(i + cfg.micro_batch_size, n)) for i in range(0, n, cfg.micro_batch_size)]
    model_fn = model_fn_for(task, model)
    ref_fn = model_fn_for(task, reference) if reference is not None else None
    model.eval()
    history: dict[str, list[float]] = {}
    for epoch in range(cfg.inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        terms = [(rows, k) for rows in rows_list for k in steps]
        for i, (rows, k) in enumerate(terms):
            share = int(keep[rows].sum())
            if share == 0:
                continue
            sync = contextlib.nullcontext() if i == len(terms) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    out = score_step(model_fn, scheduler, traj, k, rows, sampler=cfg.sampler)
                    kl = None
                    if ref_fn is not None and cfg.loss.kl_coef > 0:
                        with torch.no_grad():
                            ref_mean = score_step(ref_fn, scheduler, traj, k, rows, sampler=cfg.sampler).mean
                        kl = gaussian_step_kl(out.mean[:, None], ref_mean[:, None], out.std[:, None],
                                              reduction=cfg.sampler.log_prob_reduction)
                loss, stats = grpo_loss(out.log_prob[:, None], traj.log_probs[rows, k : k + 1], adv[rows],
                                        mask=keep[rows], kl=kl, cfg=cfg.loss)
                # Weight each term so the accumulated gradient is that of the mean over all kept
                # samples and trained steps.
                accelerator.backward(loss * (share / kept_total) / len(steps))
            for key, value in stats.to_dict().items():
                history.setdefault(key, []).append(value)
            if epoch == 0:  # before any optimiser step: exactly on-policy
                history.setdefault("on_policy_ratio_max_dev", []).append(float(stats.ratio_max_dev))
        if cfg.optim.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            history.setdefault("grad_norm", []).append(float(grad_norm))
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
    maxima = ("ratio_max_dev", "on_policy_ratio_max_dev")
    out_stats = {f"loss/{k}": (max(v) if k in maxima else sum(v) / len(v)) for k, v in history.items()}
    out_stats["loss/trained_steps"] = float(len(steps))
    return out_stats
