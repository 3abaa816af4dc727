"""The GRPO training loop for any `Task`: Algorithm 1 of MotionGRPO, top to bottom.

Why a plain function and not a Trainer class: every line of the loop is visible here and calls
one library piece. A task that needs more (a learned reward trained between updates, say) plugs
it in through :class:`LoopHooks`, so every recipe runs this one loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffgrpo.chain import SamplingChain
from diffgrpo.checkpoint import Checkpoint
from diffgrpo.checkpoint_selection import Selected, best_in_history, needs_repair, save_selected
from diffgrpo.config import GRPOConfig, SamplerConfig
from diffgrpo.diagnostics import (
    forward_gradient_agreement,
    gradient_agreement,
    parameter_vector,
    policy_movement,
    step_means,
)
from diffgrpo.guidance import check_guidance
from diffgrpo.loss import FORWARD_OBJECTIVES
from diffgrpo.nft import update_old_policy
from diffgrpo.probe import evaluate_probe
from diffgrpo.rewards import RewardSet, available_rewards
from diffgrpo.rng import make_generator
from diffgrpo.rollout import resolve_steps
from diffgrpo.run_state import GRPORun, run_record, start_run
from diffgrpo.task import Batch, Task, batch_to, x0_pred_steps_of
from diffgrpo.train_step import RolloutBatch, collect, diversity, make_perturber, policy_update

logger = logging.getLogger(__name__)


def parse_reward_specs(specs: tuple[str, ...]) -> dict[str, float]:
    """'name' or 'name:weight' strings -> {name: weight}."""
    out: dict[str, float] = {}
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            out[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"reward spec {spec!r}: the weight after ':' must be a number, e.g. {name}:0.5") from None
    return out


def check_run(task: Task, cfg: GRPOConfig, chain: SamplingChain) -> None:
    """Everything about ``cfg`` that depends on the task and the chain, checked before any data or model work.

    The config checks itself on construction, the chain on :meth:`SamplingChain.build`; this adds what
    needs both: the trained-step window against the chain's K steps, several optimiser steps against
    summed log-densities, guidance against the task's condition, and the reward names against the registry,
    and, for the objectives that re-score the stored steps (ratio, x0_regression), that the chain has
    stochastic steps whose noise survives float32 (:func:`check_stochastic_steps`).
    """
    if tuple(chain.sample_shape) != tuple(task.sample_shape):
        raise ValueError(f"the sampling chain is built for samples {chain.sample_shape} but the task samples "
                         f"{tuple(task.sample_shape)}; build it with SamplingChain.of(task, sampler)")
    num_steps = chain.num_steps
    replays_steps = cfg.loss.objective not in FORWARD_OBJECTIVES  # ratio, x0_regression: the stored steps
    if replays_steps and chain.sampler.eta == 0:
        raise ValueError(f"objective={cfg.loss.objective!r} trains the chain's stochastic steps, but sampler.eta = 0 "
                         "makes every step deterministic, so no step of the sampling chain is stochastic; raise "
                         "--sampler.eta, or pick --grpo.loss.objective nft or awm (they accept a deterministic "
                         "sampler)")
    if replays_steps:  # nft and awm train on fresh forward noise: the chain's own noise is not trained on
        check_stochastic_steps(chain)
    several = cfg.inner_epochs * cfg.num_minibatches > 1
    if replays_steps and several and chain.sampler.log_prob_reduction == "sum" and cfg.loss.clip_range is None:
        raise ValueError(
            f"inner_epochs={cfg.inner_epochs} x num_minibatches={cfg.num_minibatches} optimiser steps per "
            "rollout with summed step log-probs (sampler.log_prob_reduction='sum') and no clip: after the first "
            "optimiser step a log-ratio summed over every dimension of a sample can reach hundreds of nats and "
            "exp() overflows. Pass --grpo.loss.clip-range EPS, or the sampler's log-prob-reduction mean, or "
            "--grpo.inner-epochs 1 --grpo.num-minibatches 1.")
    if cfg.steps.mode == "window" and cfg.steps.window is not None and cfg.steps.window[1] > num_steps:
        raise ValueError(f"steps.window={cfg.steps.window} ends after the chain's K={num_steps} steps; pass "
                         f"--grpo.steps.window START END with 0 <= START < END <= {num_steps}")
    window = chain.sampler.sde_window
    if cfg.steps.mode == "window" and window is not None and not (
            cfg.steps.window[0] < window[1] and window[0] < cfg.steps.window[1]):
        raise ValueError(f"steps.window={cfg.steps.window} trains no step of sampler.sde_window={window} (the only "
                         "stochastic steps); make the windows overlap")
    if cfg.diagnostics_every and cfg.conditions_per_iteration < 2:
        raise ValueError("diagnostics_every > 0 compares the gradients of two halves of the groups, so it needs "
                         "--grpo.conditions-per-iteration >= 2")
    for split in (cfg.train_split, *(cfg.probe.splits if cfg.probe.eval_every else ())):
        try:
            count = task.num_examples(split)
        except (KeyError, ValueError) as error:
            raise ValueError(f"the task has no split {split!r} (--grpo.train-split / --grpo.probe.splits): "
                             f"{error}") from None
        if split != cfg.train_split and count < 2:
            raise ValueError(f"probe split {split!r} holds {count} example(s); the probe's interval needs >= 2")
    for name in parse_reward_specs(cfg.rewards):  # names only: a reward's parameters (a URL...) come with `rewards`
        if name not in available_rewards():
            raise KeyError(f"unknown reward {name!r} in --grpo.rewards; known rewards: "
                           f"{', '.join(available_rewards()) or '(none)'} (import the module that registers it)")
    resolve_steps(x0_pred_steps_of(task), num_steps)  # the task's kept x0 steps lie on its chain
    if chain.sampler.guidance_scale != 1.0:  # one example's condition must carry its unconditional counterpart
        check_guidance(task.encode_condition(task.load_examples(cfg.train_split, torch.tensor([0]))),
                       chain.sampler.guidance_scale)


RESOLVABLE_STD = 4 * torch.finfo(torch.float32).eps
"""The smallest step std a rollout may train on: 4 float32 ulps of a unit-scale sample (about 4.8e-7).
Below it x' = mean + std z rounds back onto the mean for most entries, so a stored step is not a draw of the
Gaussian whose density the loss trains: std 1e-8 around a mean of 0.7 lands exactly on the mean whenever
|z| < 2.98 (half a float32 ulp of 0.7 over 1e-8), 99.7 % of the entries."""


def check_stochastic_steps(chain: SamplingChain) -> None:
    """Refuse, before any sampling, a training chain with no stochastic step (nothing for GRPO's density
    ratio to train) or with a stochastic step whose std is below :data:`RESOLVABLE_STD`, naming the steps.

    Why refuse rather than warn: a step that rounds onto its mean stores a sample of no Gaussian at all,
    and its log-density (of the mean itself) is the largest the step can give, so the ratio and the loss
    are wrong on every such step. Samples are assumed unit-scale (diffusion data and noise are). Each
    step's std is the chain's own (``SamplingChain.steps``, computed once when it is made). Evaluation
    chains are not checked: eta 0 is how they sample deterministically.
    """
    stds = [step.std for step in chain.steps]  # computed when the chain was made
    if not any(std > 0 for std in stds):
        raise ValueError(f"no step of the sampling chain is stochastic (eta={chain.sampler.eta}, "
                         f"sde_window={chain.sampler.sde_window}, K={chain.num_steps}): GRPO trains the density of "
                         "stochastic steps and would find none after a full rollout; raise the sampler's eta")
    tiny = {k: std for k, std in enumerate(stds) if 0 < std < RESOLVABLE_STD}
    if tiny:
        raise ValueError(f"steps {sorted(tiny)} of the sampling chain have stds "
                         f"{', '.join(f'{std:.2e}' for std in tiny.values())} (eta={chain.sampler.eta}), below "
                         f"{RESOLVABLE_STD:.1e}, a few float32 ulps of a unit-scale sample: mean + std z rounds back "
                         "onto the mean, so these steps would not be draws of the Gaussian the loss trains. Raise "
                         "the sampler's eta, or leave these steps deterministic with the sampler's sde_window")


def iteration_logs(data: RolloutBatch, stats: dict[str, float], lr: float) -> dict[str, float]:
    """The scalars logged per iteration: loss stats, advantage diagnostics, sub-rewards, diversity."""
    return {**stats, **{f"adv/{k}": v for k, v in data.advantages.diagnostics.items()},
            **{f"reward/{k}": float(v.float().mean()) for k, v in data.rewards.items()},
            "diversity/final_samples": diversity(data), "lr": lr}


def should_checkpoint(cfg: GRPOConfig, done: int) -> bool:
    return bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.num_iterations


@dataclass
class LoopHooks:
    """What a task adds to the one GRPO loop, without a second copy of it.

    Why hooks and not a subclass: the loop stays one readable function; a task with a learned reward
    (the ego-motion perceptual critic) plugs in the critic's training step and its checkpoint state.
    """

    after_update: Callable[[int, RolloutBatch, Batch], dict[str, float]] | None = None
    """Called after each policy update with (iteration, this iteration's rollouts, the batch of B
    conditions before expansion); returns scalars to log. Runs on every process."""
    shared_state: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None
    """State identical on every process saved with each checkpoint: (tensors, JSON-able meta)."""
    load_shared_state: Callable[[Checkpoint], None] | None = None
    """Restores that state from the checkpoint a resumed run starts from."""


def train_grpo(
    task: Task,
    model: nn.Module,
    cfg: GRPOConfig,
    *,
    accelerator,
    output_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
    rewards: RewardSet | None = None,
    hooks: LoopHooks | None = None,
    chain: SamplingChain | None = None,
    probe_chain: SamplingChain | None = None,
    probe_rewards: RewardSet | None = None,
    fingerprint: dict | None = None,
) -> dict[str, list[float]]:
    """Post-train ``model`` on ``task`` for ``cfg.num_iterations`` iterations; returns the logged history.

    ``resume`` continues from the newest checkpoint in ``output_dir`` (bit-identically on CPU).
    ``stop_after`` ends the run after that many iterations *of this call* (used to simulate a
    crash in tests); checkpoints are still written on their usual schedule. ``rewards`` defaults
    to the registry's ``cfg.rewards``; ``hooks`` add task steps (see :class:`LoopHooks`).

    ``chain``: the sampling chain of the rollouts (``diffgrpo.chain``; default: the task's own chain with
    the default ``SamplerConfig``).

    Probe set (``cfg.probe.eval_every > 0``): evaluated before the first iteration, every
    ``eval_every`` iterations and after the last, on ``probe_chain`` (default ``chain``; e.g. the
    evaluation chain when rollouts use a shorter one) with ``probe_rewards`` (default ``rewards``;
    pass fixed rewards when a reward is learned during the run).

    Selection (``cfg.selection.metric``, e.g. ``metric/validation/mpjpe_mm`` with ``mode='min'``): after each
    probe evaluation that beats every earlier one (the one before training included), the probed weights are
    written to ``<output_dir>/best/`` (``diffgrpo.checkpoint_selection``); a resume continues the same choice
    (the best so far is read from the checkpoint's history).

    ``fingerprint``: the job's own settings that feed the rewards, the chain or the data (JSON-able); every
    checkpoint records them with the GRPO config, the chain, the task and its data, and a resume under
    other ones is refused naming them (``diffgrpo.run_state.run_record``). Without ``resume`` an output
    directory holding checkpoints is refused unless ``cfg.overwrite_output_dir``.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    hooks = hooks or LoopHooks()
    chain = chain if chain is not None else SamplingChain.of(task, SamplerConfig())
    check_run(task, cfg, chain)
    rewards = rewards or RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    perturber = make_perturber(cfg)
    probe_chain = probe_chain or chain
    probe_rewards = probe_rewards or rewards
    record = run_record(cfg, chain, task, job=fingerprint)
    run, ckpt = start_run(task, model, cfg, accelerator=accelerator, output_dir=output_dir, resume=resume,
                          record=record)
    if ckpt is not None and hooks.load_shared_state is not None:
        hooks.load_shared_state(ckpt)
    policy = accelerator.unwrap_model(run.model)  # the module itself (DDP shares its parameters)
    every = cfg.probe.eval_every

    def probed_weights():
        return run.ema.swapped_in(policy) if run.ema is not None and cfg.ema.use_for_eval else nullcontext()

    def probe(done: int) -> Selected | None:
        """Evaluate the probe set; returns the new selection when this evaluation beats the best so far."""
        with probed_weights():
            values = evaluate_probe(task, policy, probe_chain, cfg.probe, rewards=probe_rewards,
                                    micro_batch_size=cfg.micro_batch_size, device=accelerator.device)
        logs = run.log_probe(done, values)
        accelerator.log({k: v for k, v in logs.items() if "/ci_" not in k}, step=done)
        if not cfg.selection.metric:
            return None
        best = best_in_history(run.history, cfg.selection)  # raises naming the probe's keys for an unknown metric
        return best if best is not None and best.iteration == done else None

    def keep(selected: Selected | None) -> None:
        """Write the selected checkpoint (after the checkpoint of its iteration: ``diffgrpo.checkpoint_selection``)."""
        if selected is not None:
            if accelerator.is_main_process:
                with probed_weights():
                    save_selected(policy, output_dir, selected, run.run_id)
            accelerator.wait_for_everyone()

    if cfg.selection.metric and ckpt is not None:  # a crash between a checkpoint and its selected folder
        best = best_in_history(run.history, cfg.selection)
        keep(best if needs_repair(output_dir, best, run.start, run.run_id) else None)
    if every and run.start == 0:
        keep(probe(0))
    theta_start = parameter_vector(policy) if cfg.diagnostics_every else None
    end = cfg.num_iterations if stop_after is None else min(cfg.num_iterations, run.start + stop_after)
    bar = tqdm(range(run.start, end), desc="GRPO", disable=not accelerator.is_main_process, initial=run.start,
               total=cfg.num_iterations)
    for it in bar:
        tick = time.perf_counter()
        indices = run.stream.next(cfg.conditions_per_iteration)                                # Alg. 1 l.3
        batch = batch_to(task.load_examples(cfg.train_split, indices), accelerator.device)
        data = collect(task, policy, chain, batch, cfg=cfg,                               # l.4-6
                       rewards=rewards, perturber=perturber, generator=run.streams,
                       group_id_offset=group_id_offset(it, rank, world, cfg.conditions_per_iteration),
                       autocast=accelerator.autocast)
        diagnose = bool(cfg.diagnostics_every) and it % cfg.diagnostics_every == 0
        before = update_diagnostics_before(task, policy, chain, data, cfg, it, run) if diagnose else None
        theta_before = parameter_vector(policy)
        stats = policy_update(task, run.model, chain, data, run.optimizer, cfg=cfg,       # l.7-9
                              generator=run.streams.step_selection, accelerator=accelerator,
                              lr_scheduler=run.lr_schedule, reference=run.reference,
                              order_generator=run.streams.minibatch_order, guard=run.guard,
                              old_policy=run.old_policy)
        stats["policy/relative_step"] = relative_change(parameter_vector(policy), theta_before)
        if run.ema is not None:
            run.ema.update(policy)
        if run.old_policy is not None:  # DiffusionNFT's old policy follows the trained one with its schedule
            stats["old_policy/decay"] = update_old_policy(run.old_policy, policy, it, cfg.loss.old_policy)
        if before is not None:
            stats.update(update_diagnostics_after(task, policy, chain, data, cfg, before, theta_start))
        if hooks.after_update is not None:                                                   # e.g. a learned reward
            stats.update(hooks.after_update(it, data, batch))
        stats["time/iteration_seconds"] = time.perf_counter() - tick
        logs = run.log(accelerator, it, iteration_logs(data, stats, run.lr_schedule.get_last_lr()[0]))
        bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3g}" for k in logs if k.startswith("reward/")})
        selected = None
        if every and ((it + 1) % every == 0 or it + 1 == cfg.num_iterations):
            selected = probe(it + 1)
        if should_checkpoint(cfg, it + 1):
            tensors, meta = hooks.shared_state() if hooks.shared_state is not None else ({}, {})
            run.save(accelerator, output_dir, it + 1, record, shared_tensors=tensors, meta=meta)
        keep(selected)
    return run.history


def update_diagnostics_before(task: Task, policy: nn.Module, chain: SamplingChain, data: RolloutBatch,
                              cfg: GRPOConfig, iteration: int, run: GRPORun) -> dict:
    """Gradient agreement of the two halves of the groups and the state needed to measure the update's
    movement (``diffgrpo.diagnostics``). Ratio and x0 regression: per step bucket, per-step gradient norms and
    the step means for the update's step KL; DiffusionNFT and AWM: on the update's own forward-process loss
    (with the run's old policy and guard reference), whose noisings come from a generator of their own
    (seed, "diagnostics", iteration). Draws nothing from the run's random streams, so a run with diagnostics
    samples what one without them does."""
    if cfg.loss.objective in FORWARD_OBJECTIVES:
        generator = make_generator(cfg.seed, "diagnostics", iteration, device=data.trajectory.samples.device)
        return {"logs": forward_gradient_agreement(task, policy, chain, data, cfg=cfg, generator=generator,
                                                   old_policy=run.old_policy, reference=run.reference)}
    steps = data.trajectory.is_stochastic.nonzero().flatten().tolist()
    rows = slice(0, min(cfg.micro_batch_size, 16, data.trajectory.states.shape[0]))
    return {"logs": gradient_agreement(task, policy, chain, data, cfg=cfg, steps=steps),
            "means": step_means(task, policy, chain, data, cfg=cfg, rows=rows, steps=steps),
            "rows": rows, "steps": steps}


def update_diagnostics_after(task: Task, policy: nn.Module, chain: SamplingChain, data: RolloutBatch, cfg: GRPOConfig,
                             before: dict, theta_start) -> dict[str, float]:
    """Add the update's movement: ||theta - theta_start|| / ||theta_start|| (theta_start: the weights when this
    call began) and, for the step objectives, the per-step KL(new || old) on up to 16 stored chains."""
    logs = {**before["logs"], "policy/drift_since_start": relative_change(parameter_vector(policy), theta_start)}
    if "means" in before:
        after = step_means(task, policy, chain, data, cfg=cfg, rows=before["rows"], steps=before["steps"])
        logs.update(policy_movement(before["means"], after, reduction=chain.sampler.log_prob_reduction))
    return logs


def relative_change(theta, theta_before) -> float:
    """||theta - theta_before|| / ||theta_before||: how far an update moved the trainable weights (the
    policy's movement, logged every iteration as ``policy/relative_step``; 0 for a whole run means no learning)."""
    return float((theta - theta_before).norm() / theta_before.norm().clamp(min=1e-30))


def group_id_offset(iteration: int, process_index: int, num_processes: int, conditions_per_iteration: int) -> int:
    """First group id of this process's groups in this iteration: unique over iterations and processes."""
    return (iteration * num_processes + process_index) * conditions_per_iteration
