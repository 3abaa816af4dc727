"""Is an update signal or noise? Gradient agreement, per-step gradient norms, and how far the policy moved.

Why: a GRPO gradient is a Monte-Carlo estimate from B x G samples of a very high-dimensional
action; when it is mostly noise the weights random-walk (||theta_n - theta_0|| grows like sqrt(n))
and no held-out number moves. These measurements say so directly:

- gradient agreement: the cosine between the policy gradients of two disjoint sets of groups.
  Two independent estimates of the same expected gradient have cosine ~ SNR^2 / (1 + SNR^2) for a
  per-estimate signal-to-noise ratio SNR (||E g||^2 / E||g - E g||^2), so ~0 means noise. Taken per
  bucket of sampling steps (early / middle / late) to see which steps carry signal for the objectives
  that re-score the stored steps (ratio, x0 regression); on the update's own loss terms for the
  forward-process objectives (DiffusionNFT, AWM: :func:`forward_gradient_agreement`).
- per-step gradient norms ||grad of the step-k loss||.
- policy movement: the mean per-step KL between the step Gaussians before and after an update on
  the same stored states (equal stds, so KL = ||mu_new - mu_old||^2 / (2 std^2)), and ||delta theta||.

All functions run on the unwrapped model with ``torch.autograd.grad``: no optimiser state and no
DDP collective is touched, so they can run on any process at any time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig
from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_update import forward_terms_loss, plain_model_fn, prepare_forward_terms
from diffgrpo.loss import FORWARD_OBJECTIVES, gaussian_step_kl
from diffgrpo.modes import evaluation_mode
from diffgrpo.rollout import score_step
from diffgrpo.task import Task
from diffgrpo.train_step import RolloutBatch, model_fn_for, step_terms_loss, step_weights

STEP_BUCKETS = ("early", "middle", "late")


def step_buckets(steps: Sequence[int], num_steps: int) -> dict[str, list[int]]:
    """Split trained step indices into thirds of the chain: early (noisiest), middle, late."""
    out: dict[str, list[int]] = {name: [] for name in STEP_BUCKETS}
    for k in steps:
        out[STEP_BUCKETS[min(3 * k // max(num_steps, 1), 2)]].append(k)
    return out


def flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """d loss / d params as one float32 vector (zeros where a parameter is unused)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params, strict=True)])


def policy_gradients(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    data: RolloutBatch,
    *,
    cfg: GRPOConfig,
    row_sets: Sequence[Tensor],
    steps: Sequence[int],
) -> list[dict[int, Tensor]]:
    """Per row set and per step, the gradient of that step's GRPO loss averaged over the set's kept rows.

    ``row_sets``: (n_i,) long indices of the rows (whole groups) forming each estimate. Returns one
    {step: flat gradient} per row set. ``model`` is the unwrapped policy; nothing is accumulated in
    ``.grad`` and no collective runs.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    model_fn = model_fn_for(task, model, chain.sampler.guidance_scale)
    with evaluation_mode(model):
        out: list[dict[int, Tensor]] = []
        for rows in row_sets:
            rows = rows.to(data.trajectory.states.device)
            out.append({k: flat_grad(step_terms_loss(model_fn, chain, data, k, rows, cfg=cfg)[0], params)
                        for k in steps})
    return out


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors (0 when either is zero)."""
    denom = float(a.norm() * b.norm())
    return float(a.double() @ b.double()) / denom if denom > 0 else 0.0


def gradient_agreement(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    data: RolloutBatch,
    *,
    cfg: GRPOConfig,
    steps: Sequence[int],
) -> dict[str, float]:
    """Cosine between the gradients of the first and second half of the groups, overall and per step
    bucket, and the norm of each step's gradient (whole batch). Keys ``grad/cos_halves[/<bucket>]``,
    ``grad/norm/step_<k>``. Steps are weighted as the update weighs them (``cfg.step_weighting``);
    every step in ``steps`` is included, whatever ``cfg.steps`` selects in a given update."""
    halves = policy_gradients(task, model, chain, data, cfg=cfg, row_sets=group_halves(data), steps=steps)
    logs: dict[str, float] = {}
    num_steps = data.trajectory.num_steps
    weight = step_weights(data.trajectory, list(steps), cfg.step_weighting)  # as the update weighs its steps
    for bucket, members in {"all": list(steps), **step_buckets(steps, num_steps)}.items():
        if not members:
            continue
        a = sum(weight[k] * halves[0][k] for k in members)
        b = sum(weight[k] * halves[1][k] for k in members)
        logs["grad/cos_halves" + ("" if bucket == "all" else f"/{bucket}")] = cosine(a, b)
    for k in steps:
        # mean of the two halves' gradients (each averaged over its own rows) ~ the whole batch's
        logs[f"grad/norm/step_{k:02d}"] = float((0.5 * (halves[0][k] + halves[1][k])).norm())
    return logs


def group_halves(data: RolloutBatch) -> list[Tensor]:
    """(n_i,) row indices of the first and the second half of the batch's groups (whole groups each)."""
    group_ids = data.trajectory.group_ids
    unique = torch.unique(group_ids)
    if unique.numel() < 2:
        raise ValueError("gradient agreement needs at least 2 groups (conditions) in the batch")
    first = torch.isin(group_ids, unique[: unique.numel() // 2])
    return [first.nonzero().flatten(), (~first).nonzero().flatten()]


def forward_gradients(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    data: RolloutBatch,
    *,
    cfg: GRPOConfig,
    generator: torch.Generator,
    row_sets: Sequence[Tensor],
    old_policy: ParameterEMA | None = None,
    reference: nn.Module | None = None,
) -> list[Tensor]:
    """Per row set, the gradient of a forward-process update's loss (DiffusionNFT, AWM) at the current weights.

    The loss is the update's own (``diffgrpo.forward_update``): ``cfg.loss.timesteps_per_sample`` forward
    noisings of the rollout's final samples, drawn from ``generator`` (pass one of its own inside a run, not a
    run stream, so that the run samples what it would without the measurement), with ``old_policy`` (objective
    'nft') and the guard's ``reference`` (``kl_coef > 0``). ``row_sets``: (n_i,) row indices; each set runs in
    micro-batches of ``cfg.micro_batch_size`` rows weighted by their kept rows (``data.advantages.mask``) as the
    update weighs them (a set with no kept row has gradient 0). Returns flat float32 CPU vectors. Raises
    ValueError for a step objective (use :func:`policy_gradients`). Nothing is accumulated in ``.grad``.
    """
    if cfg.loss.objective not in FORWARD_OBJECTIVES:
        raise ValueError(f"objective={cfg.loss.objective!r} trains the stored steps: use policy_gradients")
    params = [p for p in model.parameters() if p.requires_grad]
    traj = data.trajectory
    n = traj.samples.shape[0]
    step = cfg.micro_batch_size
    model_fn = plain_model_fn(task, model)
    draws = range(cfg.loss.timesteps_per_sample)
    mask = data.advantages.mask
    out = []
    with evaluation_mode(model):
        terms = prepare_forward_terms(task, model, chain, traj.samples, traj.cond,
                                      [slice(i, min(i + step, n)) for i in range(0, n, step)], cfg=cfg,
                                      generator=generator, reference=reference, old_policy=old_policy)
        for rows in row_sets:
            rows = rows.to(traj.samples.device)
            kept = float(mask[rows].sum())
            grad = torch.zeros(sum(p.numel() for p in params))
            for chunk in rows.split(step):
                share = float(mask[chunk].sum()) / kept if kept > 0 else 0.0  # each term averages its kept rows
                if share == 0:
                    continue
                loss = sum(forward_terms_loss(model_fn, terms, traj.cond, data.advantages.advantages,
                                              mask, j, chunk, cfg=cfg)[0] for j in draws)
                grad += flat_grad(loss / len(draws), params).cpu() * share
            out.append(grad)
    return out


def forward_gradient_agreement(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    data: RolloutBatch,
    *,
    cfg: GRPOConfig,
    generator: torch.Generator,
    old_policy: ParameterEMA | None = None,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Gradient agreement of the forward-process objectives (DiffusionNFT, AWM), at the current weights: the
    cosine between the update-loss gradients of the first and the second half of the groups
    (``grad/cos_halves``) and the norm of their mean (``grad/norm``), from :func:`forward_gradients` (its
    arguments). Raises ValueError for a step objective (use :func:`gradient_agreement`) or fewer than 2 groups."""
    if cfg.loss.objective not in FORWARD_OBJECTIVES:
        raise ValueError(f"objective={cfg.loss.objective!r} trains the stored steps: use gradient_agreement")
    halves = forward_gradients(task, model, chain, data, cfg=cfg, generator=generator, row_sets=group_halves(data),
                               old_policy=old_policy, reference=reference)
    return {"grad/cos_halves": cosine(*halves), "grad/norm": float((0.5 * (halves[0] + halves[1])).norm())}


@torch.no_grad()
def step_means(task: Task, model: nn.Module, chain: SamplingChain, data: RolloutBatch, *, cfg: GRPOConfig,
               rows: slice, steps: Sequence[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """(mean, std) of the step Gaussians of ``rows`` at ``steps`` under ``model`` (for policy movement), the
    means in the coordinates their density lives on (``StepOutput.density_coordinates``)."""
    model_fn = model_fn_for(task, model, chain.sampler.guidance_scale)
    with evaluation_mode(model):
        out = {}
        for k in steps:
            step = score_step(model_fn, chain, data.trajectory, k, rows)
            # (rows, r), (rows, 1)
            out[k] = (step.density_coordinates(step.mean).float(), step.std.reshape(-1, 1).float())
    return out


def policy_movement(before: dict[int, tuple[Tensor, Tensor]], after: dict[int, tuple[Tensor, Tensor]],
                    *, reduction: str) -> dict[str, float]:
    """Mean per-step KL(pi_new || pi_old) over the given steps and rows (same stds), in nats
    (per dimension when ``reduction`` is 'mean', like the step log-probs)."""
    kls = []
    for k, (mean_old, std) in before.items():
        mean_new = after[k][0]
        kls.append(gaussian_step_kl(mean_new[:, None], mean_old[:, None], std[:, None], reduction=reduction).mean())
    return {"policy/step_kl": float(torch.stack(kls).mean())} if kls else {}


def parameter_vector(model: nn.Module) -> Tensor:
    """All trainable parameters as one detached float32 vector (a snapshot)."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters() if p.requires_grad]).clone()
