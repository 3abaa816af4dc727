"""The two halves of a GRPO iteration as plain functions: collect, then update.

``collect`` is Algorithm 1's sampling half: expand each condition into a group, perturb the
condition per member, roll out under no_grad with group-shared initial noise, decode, score,
and turn rewards into group-relative advantages. ``policy_update`` is the learning half:
re-score the recorded transitions under the current weights and take optimiser steps on the
GRPO surrogate, accumulating gradients over micro-batches and steps.

Both run the network on identical micro-batches (``GRPOConfig.micro_batch_size``) in the same
mode and precision, with the same classifier-free guidance (``diffgrpo.guidance``), which is what
makes the first update's importance ratios exactly 1.
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
from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig
from diffgrpo.ema import ParameterEMA
from diffgrpo.finite_update import FiniteUpdateGuard
from diffgrpo.forward_update import forward_terms_loss, plain_model_fn, prepare_forward_terms
from diffgrpo.guard import prediction_gap
from diffgrpo.guidance import guided_model_fn
from diffgrpo.loss import (
    FORWARD_OBJECTIVES,
    advantage_weighted_x0_loss,
    gaussian_step_kl,
    grpo_loss,
    select_steps,
)
from diffgrpo.perturb import perturber_from_config
from diffgrpo.rewards import RewardOutput, RewardSet
from diffgrpo.rng import RandomStreams, as_streams
from diffgrpo.rollout import Trajectory, group_ids_for, rollout, score_step
from diffgrpo.task import (
    Batch,
    Task,
    batch_size,
    concat_rows,
    cond_device,
    repeat_batch,
    select_rows,
    x0_pred_steps_of,
)


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
    """The configured condition perturber (``cfg.perturb``) from the registry: ``perturb.perturber_from_config``."""
    return perturber_from_config(cfg.perturb)


def model_fn_for(task: Task, model: nn.Module, guidance_scale: float = 1.0):
    """Bind the task's network call to a model: (x_t, t, cond) -> output, guided with
    ``guidance_scale`` (``diffgrpo.guidance``; 1 = the plain call)."""
    return guided_model_fn(task.predict, model, guidance_scale)


@torch.no_grad()
def collect(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    batch: Batch,
    *,
    cfg: GRPOConfig,
    rewards: RewardSet,
    perturber,
    generator: torch.Generator | RandomStreams,
    group_id_offset: int,
    autocast=contextlib.nullcontext,
    overlap_rewards: bool = True,
) -> RolloutBatch:
    """Alg. 1 lines 2-6 for one batch of B conditions: perturb, sample G each, score, normalise.

    ``generator``: named streams (perturbation, initial noise, step noise drawn from their own
    generators) or one generator for all of them.

    With ``cfg.rollout_chunks = C > 1`` the B conditions are sampled in C consecutive chunks; each
    chunk is decoded and its rewards are submitted to ``rewards``' worker thread, so a slow (e.g.
    remote) reward of chunk c runs while chunk c + 1 samples. ``overlap_rewards=False`` scores each
    chunk in this thread instead: the results are bit-identical, only the timing differs. Chunking
    itself changes the order of the noise draws, so C = 1 and C = 2 sample different noise.
    """
    streams = as_streams(generator)
    num_conditions = batch_size(batch)
    if num_conditions == 0:
        raise ValueError("collect got an empty batch: 0 conditions (the training batch of "
                         "--grpo.conditions-per-iteration examples from --grpo.train-split); pass at least one")
    if num_conditions % cfg.rollout_chunks:  # equal chunks, or the last rows would never be sampled
        raise ValueError(f"rollout_chunks={cfg.rollout_chunks} does not divide the batch's B={num_conditions} "
                         f"conditions; pass B divisible by --grpo.rollout-chunks {cfg.rollout_chunks} (or change it)")
    expanded = repeat_batch(batch, cfg.group_size)  # (B*G, ...)
    raw = task.raw_condition(batch)  # (B, T, D)
    if not bool(torch.isfinite(raw).all()):
        bad = (~torch.isfinite(raw)).flatten(1).any(1).nonzero().flatten()
        raise ValueError(f"the raw condition of batch rows {sorted(set(bad.tolist()))} holds NaN or inf; "
                         "fix or drop those examples in the task's load_examples")
    heads = perturbed_conditions_per_group(cfg)  # distinct perturbed conditions per group
    perturbed = perturber(raw.repeat_interleave(heads, dim=0), streams.perturbation)  # (B*heads, T, D)
    expanded = task.with_raw_condition(expanded, perturbed.repeat_interleave(cfg.group_size // heads, dim=0))
    cond = task.encode_condition(expanded)
    device = cond_device(cond)
    group_ids = group_ids_for(num_conditions, cfg.group_size, offset=group_id_offset, device=device)
    # Advantages compare samples that saw one condition: the group, or its same-condition sub-group.
    advantage_ids = group_ids if cfg.perturb.sharing != "nested" else (
        group_ids * heads + torch.arange(cfg.group_size, device=device).repeat(num_conditions)
        // (cfg.group_size // heads))
    model.eval()  # the policy is one fixed function in rollout and update: no dropout/BN noise
    model_fn = model_fn_for(task, model, chain.sampler.guidance_scale)
    rows_per_chunk = num_conditions // cfg.rollout_chunks * cfg.group_size
    trajectories, decoded_parts, scored_parts = [], [], []
    for c in range(cfg.rollout_chunks):
        rows = slice(c * rows_per_chunk, (c + 1) * rows_per_chunk)
        with autocast():
            part = rollout(model_fn, chain, select_rows(cond, rows), group_ids[rows],
                           generator=streams.initial_noise, micro_batch_size=cfg.micro_batch_size,
                           step_generator=streams.step_noise, x0_pred_steps=x0_pred_steps_of(task))
        chunk_batch = expanded if cfg.rollout_chunks == 1 else select_rows(expanded, rows)
        decoded = task.decode(part.samples, chunk_batch)
        overlap = overlap_rewards and cfg.rollout_chunks > 1
        scored_parts.append(rewards.submit(decoded, chunk_batch) if overlap else rewards(decoded, chunk_batch))
        trajectories.append(part)
        decoded_parts.append(decoded)
    scored = concat_reward_outputs([s if isinstance(s, RewardOutput) else s.result() for s in scored_parts])
    trajectory = trajectories[0] if len(trajectories) == 1 else Trajectory.concat(trajectories)
    decoded = decoded_parts[0] if len(decoded_parts) == 1 else concat_rows(decoded_parts)
    advantages = compute_advantages(scored.components, advantage_ids,
                                    dataclasses.replace(cfg.advantages, weights=scored.weights))
    return RolloutBatch(trajectory, expanded, decoded, scored.components, advantages)


def concat_reward_outputs(parts: list[RewardOutput]) -> RewardOutput:
    """The rewards of consecutive rollout chunks as one output over all their samples."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.components.keys() != first.components.keys() or p.weights != first.weights for p in parts):
        raise ValueError("rollout chunks produced different sub-rewards or weights; a reward must return the same "
                         "keys for every batch")
    return RewardOutput(components={k: torch.cat([p.components[k] for p in parts]) for k in first.components},
                        weights=dict(first.weights), total=torch.cat([p.total for p in parts]))


def perturbed_conditions_per_group(cfg: GRPOConfig) -> int:
    """How many distinct perturbed conditions a group holds under ``cfg.perturb.sharing``."""
    sharing = cfg.perturb.sharing
    if sharing == "member":
        return cfg.group_size
    if sharing == "group":
        return 1
    if sharing == "nested":
        return cfg.perturb.heads_per_group
    raise ValueError(f"perturb.sharing={sharing!r} is not one of 'member', 'group', 'nested'")


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
    chain: SamplingChain,
    data: RolloutBatch,
    optimizer: torch.optim.Optimizer,
    *,
    cfg: GRPOConfig,
    generator: torch.Generator,
    accelerator,
    lr_scheduler=None,
    reference: nn.Module | None = None,
    order_generator: torch.Generator | None = None,
    guard: FiniteUpdateGuard | None = None,
    old_policy: ParameterEMA | None = None,
) -> dict[str, float]:
    """Alg. 1 lines 7-9: ``cfg.inner_epochs`` x ``cfg.num_minibatches`` optimiser steps on ``cfg.loss.objective``.

    Objectives 'ratio' and 'x0_regression' re-score the rollout's stored steps; 'nft' and 'awm' train on
    fresh forward noisings of its final samples (``diffgrpo.forward_update``): their terms are
    (micro-batch, noise draw) instead of (micro-batch, trained step), ``generator`` draws the noisings, and
    'nft' needs ``old_policy`` (its EMA old policy, moved by the caller after the update). ``reference``:
    the frozen policy of the KL guard (needed when ``cfg.loss.kl_coef > 0``).

    ``generator`` draws the trained steps (``cfg.steps``); ``order_generator`` (default: ``generator``)
    shuffles the terms into minibatches, so runs that differ only in ``num_minibatches`` train on the
    same steps.

    The rollout batch's terms, one per (micro-batch, trained step), form each epoch; with several
    minibatches they are shuffled (``order_generator``) and split into ``num_minibatches`` near-equal
    parts, one optimiser step each. The first optimiser step is exactly on-policy (ratio 1, logged
    as ``loss/on_policy_ratio_max_dev``); later ones re-score stored steps under moved weights.
    DDP gradient synchronisation happens only on the last backward of each optimiser step.

    The gradient of an optimiser step is that of the mean over its terms' kept samples on every
    process (each term weighted by ``cfg.step_weighting``): each process weights its terms by
    ``num_processes x weight x kept / (weighted kept terms of all processes)`` and DDP averages the
    gradients over processes. A process that keeps more samples than another (zero-std groups
    dropped on one rank only) therefore weighs in proportionally.

    Every process runs the same forward/backward passes in the same order, because the last
    backward all-reduces gradients: a rank skipping it would leave the others waiting in the
    collective. Which micro-batches and minibatches run is thus decided from the kept counts of all
    processes (small gathers): one is skipped only when no process keeps a sample in it, and a
    process that keeps none of it still runs it, with a loss of exactly 0.

    An optimiser step whose loss or gradient is not finite is skipped on every process, or stops the run
    (``guard``, default from ``cfg.optim``; ``diffgrpo.finite_update``); ``loss/nonfinite_steps`` counts them.
    """
    traj = data.trajectory
    n = traj.states.shape[0]
    if n == 0:
        raise ValueError("policy_update got an empty rollout batch (0 chains); collect() at least one condition")
    forward = cfg.loss.objective in FORWARD_OBJECTIVES
    keep = data.advantages.mask
    rows_list = [slice(i, min(i + cfg.micro_batch_size, n)) for i in range(0, n, cfg.micro_batch_size)]
    if forward:  # one term per (micro-batch, noise draw); everything fixed during the update computed now
        steps = list(range(cfg.loss.timesteps_per_sample))
        forward_terms = prepare_forward_terms(task, model, chain, traj.samples, traj.cond, rows_list, cfg=cfg,
                                              generator=generator, autocast=accelerator.autocast,
                                              reference=reference, old_policy=old_policy)
        step_weight = dict.fromkeys(steps, 1.0)
    else:
        trained = select_steps(traj.num_steps, cfg.steps.mode, fraction=cfg.steps.fraction, window=cfg.steps.window,
                               generator=generator, is_stochastic=traj.is_stochastic.cpu())
        steps = trained.nonzero().flatten().tolist()
        if not steps:
            raise ValueError("no stochastic step selected for training: widen --grpo.steps.window or raise "
                             "--grpo.steps.fraction, and check that sampler.eta > 0")
        step_weight = step_weights(traj, steps, cfg.step_weighting)
    kept_all = kept_counts_of_all_processes(accelerator, [int(keep[rows].sum()) for rows in rows_list],
                                            num_steps=len(steps))  # [M] summed over processes
    rows_list = [rows for rows, kept in zip(rows_list, kept_all.tolist(), strict=True) if kept > 0]
    terms = [(rows, k) for rows in rows_list for k in steps]
    if not terms:  # every group of every process dropped (decided alike everywhere): no update this iteration
        return {"loss/trained_steps": float(len(steps)), "loss/optimizer_steps": 0.0, "loss/nonfinite_steps": 0.0}
    # Fewer terms than minibatches (micro-batches dropped): one term per optimiser step.
    chunks = minibatch_terms(terms, cfg.inner_epochs, min(cfg.num_minibatches, len(terms)),
                             order_generator if order_generator is not None else generator)  # [E x P] term lists
    # Weighted kept samples of each optimiser step over all processes: the normaliser of its mean.
    weighted = [sum(step_weight[k] * int(keep[rows].sum()) for rows, k in chunk) for chunk in chunks]
    totals = weighted_totals_of_all_processes(accelerator, weighted)
    world = accelerator.num_processes
    model_fn = plain_model_fn(task, model) if forward else model_fn_for(task, model, chain.sampler.guidance_scale)
    ref_fn = model_fn_for(task, reference, chain.sampler.guidance_scale) if reference is not None else None
    model.eval()
    history: dict[str, list[float]] = {"optimizer_steps": [], "nonfinite_steps": []}
    guard = guard if guard is not None else FiniteUpdateGuard.from_config(cfg.optim)
    for index, (chunk, total) in enumerate(zip(chunks, totals, strict=True)):
        if total <= 0:
            continue  # no process keeps a sample in this minibatch (decided alike on every process)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for i, (rows, k) in enumerate(chunk):
            share = int(keep[rows].sum())  # may be 0 here while other processes train on this micro-batch
            sync = contextlib.nullcontext() if i == len(chunk) - 1 else accelerator.no_sync(model)
            with sync:
                with accelerator.autocast():
                    if forward:
                        loss, stats = forward_terms_loss(model_fn, forward_terms, traj.cond,
                                                         data.advantages.advantages, keep, k, rows, cfg=cfg)
                    else:
                        loss, stats = step_terms_loss(model_fn, chain, data, k, rows, cfg=cfg, ref_fn=ref_fn)
                accelerator.backward(loss * (world * step_weight[k] * share / total))
            losses.append(loss.detach())
            if share == 0:
                continue  # no term of this process entered the loss: nothing to report
            for key, value in stats.to_dict().items():
                history.setdefault(key, []).append(value)
            if index == 0 and not forward:  # before any optimiser step: exactly on-policy
                history.setdefault("on_policy_ratio_max_dev", []).append(float(stats.ratio_max_dev))
        if not guard.allow_step(accelerator, model, losses, where=f"optimiser step {index + 1} of {len(chunks)}"):
            optimizer.zero_grad(set_to_none=True)  # skipped alike on every process: weights and moments untouched
            history["nonfinite_steps"].append(1.0)
            continue
        if cfg.optim.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            history.setdefault("grad_norm", []).append(float(grad_norm))
        optimizer.step()
        history.setdefault("optimizer_steps", []).append(1.0)
        if lr_scheduler is not None:
            lr_scheduler.step()
    maxima = ("ratio_max_dev", "on_policy_ratio_max_dev", "old_deviation_max")
    sums = ("optimizer_steps", "nonfinite_steps")
    out_stats = {f"loss/{k}": (max(v) if k in maxima else float(sum(v)) if k in sums else sum(v) / len(v))
                 for k, v in history.items() if v or k in sums}
    out_stats["loss/trained_steps"] = float(len(steps))
    return out_stats


def step_weights(traj: Trajectory, steps: list[int], weighting: str) -> dict[int, float]:
    """Weight of each trained step's term in the loss, mean 1 over the trained steps.

    uniform: 1 (the paper: mean over steps). unit_score: proportional to the step's std, which puts
    every step's score (x' - mean) / std^2 x d mean on one scale; with uniform weights the low-noise
    late steps, whose 1/std is largest, dominate the gradient although their noise barely changes
    the outcome.
    """
    if weighting == "uniform":
        return dict.fromkeys(steps, 1.0)
    if weighting == "unit_score":
        stds = {k: float(traj.step_stds[k]) for k in steps}
        mean = sum(stds.values()) / len(stds)
        return {k: std / mean for k, std in stds.items()}
    raise ValueError(f"step_weighting={weighting!r} is not one of 'uniform', 'unit_score'")


def minibatch_terms(terms: list, epochs: int, num_minibatches: int, generator: torch.Generator) -> list[list]:
    """The terms of every optimiser step: per epoch, ``terms`` (shuffled when split) cut into
    ``num_minibatches`` near-equal consecutive parts. Needs num_minibatches <= len(terms)."""
    if num_minibatches > len(terms):
        raise ValueError(f"num_minibatches={num_minibatches} exceeds the {len(terms)} (micro-batch, step) terms of "
                         "this update; lower --grpo.num-minibatches")
    chunks = []
    for _ in range(epochs):
        order = terms
        if num_minibatches > 1:
            perm = torch.randperm(len(terms), generator=generator, device=generator.device).tolist()
            order = [terms[i] for i in perm]
        bounds = [round(j * len(order) / num_minibatches) for j in range(num_minibatches + 1)]
        chunks.extend(order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return chunks


def weighted_totals_of_all_processes(accelerator, weighted: list[float]) -> list[float]:
    """Per optimiser step, the weighted kept count summed over processes (the same list on every rank)."""
    if accelerator.num_processes == 1:
        return [float(w) for w in weighted]
    local = torch.tensor(weighted, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(local, reduction="sum").tolist()


def kept_counts_of_all_processes(accelerator, kept: list[int], *, num_steps: int) -> Tensor:
    """Kept samples per micro-batch (M,), summed over processes, so that every rank decides alike.

    Why: which micro-batches run decides which collectives run. Also checks that every process
    has the same number of micro-batches and trained steps, which the lock-step update needs.
    """
    if accelerator.num_processes == 1:
        return torch.tensor(kept, dtype=torch.long)
    device = accelerator.device
    shape = accelerator.gather(torch.tensor([len(kept), num_steps], dtype=torch.long, device=device)).view(-1, 2)
    if not bool((shape == shape[0]).all()):
        raise ValueError(f"processes disagree on (micro-batches, trained steps): {shape.tolist()}; every process "
                         "needs the same --conditions-per-iteration, --group-size, --micro-batch-size and --steps")
    counts = accelerator.gather(torch.tensor(kept, dtype=torch.long, device=device))  # [world * M]
    return counts.view(accelerator.num_processes, -1).sum(0).cpu()


def step_terms_loss(
    model_fn,
    chain: SamplingChain,
    data: RolloutBatch,
    step: int,
    rows: slice | Tensor,
    *,
    cfg: GRPOConfig,
    ref_fn=None,
):
    """The GRPO loss of one (micro-batch, step) term, re-scored under the current model, and its stats.

    Why one home: the update, the gradient diagnostics and the signal-to-noise script all take
    gradients of exactly this loss. The loss averages over the kept samples of ``rows``; callers
    weight it (see :func:`policy_update`).
    """
    traj = data.trajectory
    out = score_step(model_fn, chain, traj, step, rows)
    ref = None
    if ref_fn is not None and cfg.loss.kl_coef > 0:
        with torch.no_grad():
            ref = score_step(ref_fn, chain, traj, step, rows)
    mask = data.advantages.mask[rows]
    if cfg.loss.objective == "x0_regression":  # the ratio stats are still reported; the gradient is the regression's
        unguarded = dataclasses.replace(cfg.loss, kl_coef=0.0)
        _, stats = grpo_loss(out.log_prob[:, None], traj.log_probs[rows, step : step + 1],
                             data.advantages.advantages[rows], mask=mask, cfg=unguarded)
        loss = advantage_weighted_x0_loss(out.x0_pred, traj.samples[rows], data.advantages.advantages[rows], mask)
        if ref is not None:  # the guard: clean-sample prediction gap to the reference at the rollout's state
            gap = prediction_gap(out.x0_pred, ref.x0_pred)
            kl = (gap * mask).sum() / mask.sum().clamp(min=1)
            loss = loss + cfg.loss.kl_coef * kl
            stats = dataclasses.replace(stats, kl=kl.detach())
        return loss, stats
    kl = None
    if ref is not None:
        kl = gaussian_step_kl(out.density_coordinates(out.mean)[:, None], out.density_coordinates(ref.mean)[:, None],
                              out.std.reshape(-1, 1, 1), reduction=chain.sampler.log_prob_reduction)  # (rows, 1)
    return grpo_loss(out.log_prob[:, None], traj.log_probs[rows, step : step + 1],
                     data.advantages.advantages[rows], mask=mask, kl=kl, cfg=cfg.loss)
