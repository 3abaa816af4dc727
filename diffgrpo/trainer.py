"""The GRPO training loop for any `Task`: Algorithm 1 of MotionGRPO, top to bottom.

Why a plain function and not a Trainer class: every line of the loop is visible here and calls
one library piece. A task that needs more (a learned reward trained between updates, say) plugs
it in through :class:`LoopHooks`, so every recipe runs this one loop.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from diffgrpo.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from diffgrpo.config import GRPOConfig, SamplerConfig
from diffgrpo.diagnostics import gradient_agreement, parameter_vector, policy_movement, step_means
from diffgrpo.ema import ParameterEMA
from diffgrpo.guidance import check_guidance
from diffgrpo.lora import AdapterDisabledReference, has_lora
from diffgrpo.probe import evaluate_probe, probe_logs
from diffgrpo.rewards import RewardSet, available_rewards
from diffgrpo.rollout import RandomStreams, check_sampler, resolve_steps
from diffgrpo.stream import IndexStream
from diffgrpo.task import Batch, Task, batch_to, x0_pred_steps_of
from diffgrpo.train_step import RolloutBatch, collect, diversity, frozen_copy, make_perturber, policy_update

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


def make_optimizer(model: nn.Module, cfg: GRPOConfig):
    """AdamW and a linear warm-up schedule (constant afterwards)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.learning_rate,
                                  weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    warmup = max(cfg.optim.warmup_steps, 0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return optimizer, schedule


@dataclass
class GRPORun:
    """Everything a GRPO run carries from one iteration to the next (and through a checkpoint)."""

    model: nn.Module
    """The policy, as prepared by accelerate (DDP-wrapped with several processes)."""
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    stream: IndexStream
    """This process's resumable order of training conditions."""
    streams: RandomStreams
    """This process's named random streams (perturbation, initial noise, step noise, step selection)."""
    reference: nn.Module | None
    """The starting policy for the KL term (None without KL): the policy with its LoRA adapters switched
    off when it has adapters (``diffgrpo.lora.AdapterDisabledReference``), else a frozen copy."""
    start: int = 0
    """Iterations already done (> 0 after a resume)."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """Logged scalars of every iteration so far, restored on resume. Probe keys (``probe/...``,
    ``probe_diff/...``) have one entry per probe evaluation, at the iterations in ``probe/iteration``."""
    probe_baseline: dict[str, torch.Tensor] | None = None
    """The probe set's values before training (C, M) per key; paired differences are taken against it."""
    ema: ParameterEMA | None = None
    """Moving average of the trainable weights (``cfg.ema.use_ema``), saved in checkpoints."""

    def log(self, accelerator, iteration: int, values: dict[str, float]) -> dict[str, float]:
        """Average ``values`` over processes, send them to the trackers and the history."""
        values = _mean_over_processes(accelerator, values)
        accelerator.log(values, step=iteration + 1)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        return values

    def log_probe(self, iteration: int, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Record a probe evaluation after ``iteration`` iterations; the first one becomes the baseline.

        Every process evaluates the whole probe set (the same numbers), so nothing is gathered here.
        """
        if self.probe_baseline is None:
            self.probe_baseline = {k: v.clone() for k, v in values.items()}
        logs = {"probe/iteration": float(iteration), **probe_logs(values, self.probe_baseline)}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        return logs

    def save(self, accelerator, output_dir: str | Path, done: int, cfg, *,
             shared_tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> None:
        """Checkpoint after ``done`` iterations (every process must call this)."""
        shared = dict(shared_tensors or {})
        shared.update({f"probe_baseline.{k}": v for k, v in (self.probe_baseline or {}).items()})
        ema_meta = {}
        if self.ema is not None:
            shared.update({f"{EMA_PREFIX}{k}": v for k, v in self.ema.state_tensors().items()})
            ema_meta = {"ema_num_updates": self.ema.num_updates}
        save_checkpoint(accelerator, output_dir, done, model=self.model, optimizer=self.optimizer,
                        lr_scheduler=self.lr_schedule, rank_tensors=self.streams.get_state(),
                        rank_meta={"stream": self.stream.state_dict()}, shared_tensors=shared,
                        meta={"config": json.dumps(asdict(cfg), default=str), "history": json.dumps(self.history),
                              **ema_meta, **(meta or {})},
                        trainable_only=has_lora(self.model))


EMA_PREFIX = "ema."
"""Prefix of the EMA's tensors among a checkpoint's shared tensors."""


def check_run(task: Task, cfg: GRPOConfig) -> None:
    """Everything about ``cfg`` that depends on the task, checked before any data or model work.

    The config checks itself on construction; this adds what needs the task: the sampler on the
    task's scheduler and chain (``rollout.check_sampler``), the trained-step window against the
    chain's K steps, and the reward names against the registry.
    """
    timesteps = task.sampling_timesteps()
    check_sampler(task.make_scheduler(), timesteps, cfg.sampler)
    cfg.sampler.exploration_subspace(tuple(task.sample_shape))  # raises if the noise subspace does not fit
    num_steps = len(timesteps) - 1
    if cfg.steps.mode == "window" and cfg.steps.window is not None and cfg.steps.window[1] > num_steps:
        raise ValueError(f"steps.window={cfg.steps.window} ends after the chain's K={num_steps} steps; pass "
                         f"--grpo.steps.window START END with 0 <= START < END <= {num_steps}")
    window = cfg.sampler.sde_window
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
    if cfg.sampler.guidance_scale != 1.0:  # one example's condition must carry its unconditional counterpart
        check_guidance(task.encode_condition(task.load_examples(cfg.train_split, torch.tensor([0]))),
                       cfg.sampler.guidance_scale)


def start_run(task: Task, model: nn.Module, cfg: GRPOConfig, *, accelerator, output_dir: str | Path,
              resume: bool = False) -> tuple[GRPORun, Checkpoint | None]:
    """Optimiser, schedule, data stream and RNG for a run; restored from the newest checkpoint if ``resume``.

    Returns the run and the checkpoint it resumed from (None for a fresh start), so a recipe can
    restore its own extra state (e.g. a learned reward model) from ``checkpoint.shared_tensors``.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    optimizer, lr_schedule = make_optimizer(model, cfg)
    reference = reference_policy(model) if cfg.loss.kl_coef > 0 else None
    ema = ParameterEMA(model, cfg.ema.decay) if cfg.ema.use_ema else None
    model, optimizer = accelerator.prepare(model, optimizer)
    run = GRPORun(model=model, optimizer=optimizer, lr_schedule=lr_schedule,
                  stream=IndexStream(task.num_examples(cfg.train_split), cfg.seed, rank, world),
                  streams=RandomStreams.from_seed(cfg.seed, rank, device=accelerator.device), reference=reference,
                  ema=ema)
    ckpt = None
    if resume and (path := latest_checkpoint(output_dir)) is not None:
        ckpt = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, lr_scheduler=lr_schedule)
        check_resumable(json.loads(ckpt.meta.get("config", "{}")), json.loads(json.dumps(asdict(cfg), default=str)),
                        path)
        run.streams.set_state(ckpt.rank_tensors)
        prefix = "probe_baseline."
        baseline = {k[len(prefix):]: v for k, v in ckpt.shared_tensors.items() if k.startswith(prefix)}
        run.probe_baseline = baseline or None
        if ema is not None:
            ema.load_state_tensors({k[len(EMA_PREFIX):]: v for k, v in ckpt.shared_tensors.items()
                                    if k.startswith(EMA_PREFIX)}, int(ckpt.meta.get("ema_num_updates", 0)))
        run.stream.load_state_dict(ckpt.rank_meta["stream"])
        run.start = ckpt.step
        run.history = json.loads(ckpt.meta.get("history", "{}"))
        logger.info("resumed from %s at iteration %d", path, run.start)
    elif resume:
        logger.info("--resume given but %s holds no checkpoint: starting from scratch", output_dir)
    return run, ckpt


def reference_policy(model: nn.Module) -> nn.Module:
    """The KL reference: the policy with its LoRA adapters switched off if it has any (no copy of the
    weights), else a frozen copy of the starting weights."""
    return AdapterDisabledReference(model) if has_lora(model) else frozen_copy(model)


RESUMABLE_CHANGES = ("num_iterations", "checkpoint_every")
"""GRPOConfig fields a resumed run may change (e.g. to extend a finished run); any other change is refused."""

FIELDS_ADDED_LATER = {("sampler", "guidance_scale"): 1.0, ("rollout_chunks",): 1,
                      ("sampler", "noise_frequencies"): None, ("sampler", "noise_features"): None,
                      ("ema",): {"use_ema": False, "decay": 0.9, "use_for_eval": False}}
"""Config fields newer than some checkpoints, with the value that reproduces the older behaviour: a
checkpoint without one resumes when the current run keeps that value."""


def with_added_fields(saved: dict) -> dict:
    """``saved`` with every field of :data:`FIELDS_ADDED_LATER` it lacks set to its old-behaviour value."""
    out = json.loads(json.dumps(saved))
    for path, value in FIELDS_ADDED_LATER.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    return out


def check_resumable(saved: dict, current: dict, path) -> None:
    """Refuse to continue a checkpoint under a different configuration (it would silently mix two runs)."""
    if not saved:
        raise ValueError(f"{path} records no config; it was not written by train_grpo, so it cannot be resumed")
    saved = with_added_fields(saved)
    changed = {k: (saved.get(k), current[k]) for k in current
               if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]}
    if changed:
        raise ValueError(f"--resume with a different configuration than {path} was written with (saved, now): "
                         f"{changed}; resume with the same flags, or start a new --output-dir")


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
    probe_task: Task | None = None,
    probe_sampler: SamplerConfig | None = None,
    probe_rewards: RewardSet | None = None,
) -> dict[str, list[float]]:
    """Post-train ``model`` on ``task`` for ``cfg.num_iterations`` iterations; returns the logged history.

    ``resume`` continues from the newest checkpoint in ``output_dir`` (bit-identically on CPU).
    ``stop_after`` ends the run after that many iterations *of this call* (used to simulate a
    crash in tests); checkpoints are still written on their usual schedule. ``rewards`` defaults
    to the registry's ``cfg.rewards``; ``hooks`` add task steps (see :class:`LoopHooks`).

    Probe set (``cfg.probe.eval_every > 0``): evaluated before the first iteration, every
    ``eval_every`` iterations and after the last, on ``probe_task`` (default ``task``; e.g. the same
    task with the evaluation chain when rollouts use a shorter one) with ``probe_sampler`` (default
    ``cfg.sampler``) and ``probe_rewards`` (default ``rewards``; pass fixed rewards when a reward
    is learned during the run).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    hooks = hooks or LoopHooks()
    check_run(task, cfg)
    scheduler = task.make_scheduler()
    rewards = rewards or RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    perturber = make_perturber(cfg)
    probe_task = probe_task or task
    probe_sampler = probe_sampler or cfg.sampler
    probe_rewards = probe_rewards or rewards
    run, ckpt = start_run(task, model, cfg, accelerator=accelerator, output_dir=output_dir, resume=resume)
    if ckpt is not None and hooks.load_shared_state is not None:
        hooks.load_shared_state(ckpt)
    policy = accelerator.unwrap_model(run.model)  # the module itself (DDP shares its parameters)
    every = cfg.probe.eval_every

    def probe(done: int) -> None:
        weights = run.ema.swapped_in(policy) if run.ema is not None and cfg.ema.use_for_eval else nullcontext()
        with weights:
            values = evaluate_probe(probe_task, policy, probe_task.make_scheduler(), cfg.probe, sampler=probe_sampler,
                                    rewards=probe_rewards,
                                    micro_batch_size=cfg.micro_batch_size, device=accelerator.device)
        logs = run.log_probe(done, values)
        accelerator.log({k: v for k, v in logs.items() if "/ci_" not in k}, step=done)

    if every and run.start == 0:
        probe(0)
    theta_start = parameter_vector(policy) if cfg.diagnostics_every else None
    end = cfg.num_iterations if stop_after is None else min(cfg.num_iterations, run.start + stop_after)
    bar = tqdm(range(run.start, end), desc="GRPO", disable=not accelerator.is_main_process, initial=run.start,
               total=cfg.num_iterations)
    for it in bar:
        tick = time.perf_counter()
        indices = run.stream.next(cfg.conditions_per_iteration)                                # Alg. 1 l.3
        batch = batch_to(task.load_examples(cfg.train_split, indices), accelerator.device)
        data = collect(task, policy, scheduler, batch, cfg=cfg,                               # l.4-6
                       rewards=rewards, perturber=perturber, generator=run.streams,
                       group_id_offset=group_id_offset(it, rank, world, cfg.conditions_per_iteration),
                       autocast=accelerator.autocast)
        diagnose = bool(cfg.diagnostics_every) and it % cfg.diagnostics_every == 0
        before = update_diagnostics_before(task, policy, scheduler, data, cfg) if diagnose else None
        stats = policy_update(task, run.model, scheduler, data, run.optimizer, cfg=cfg,       # l.7-9
                              generator=run.streams.step_selection, accelerator=accelerator,
                              lr_scheduler=run.lr_schedule, reference=run.reference,
                              order_generator=run.streams.minibatch_order)
        if run.ema is not None:
            run.ema.update(policy)
        if before is not None:
            stats.update(update_diagnostics_after(task, policy, scheduler, data, cfg, before, theta_start))
        if hooks.after_update is not None:                                                   # e.g. a learned reward
            stats.update(hooks.after_update(it, data, batch))
        stats["time/iteration_seconds"] = time.perf_counter() - tick
        logs = run.log(accelerator, it, iteration_logs(data, stats, run.lr_schedule.get_last_lr()[0]))
        bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3g}" for k in logs if k.startswith("reward/")})
        if every and ((it + 1) % every == 0 or it + 1 == cfg.num_iterations):
            probe(it + 1)
        if should_checkpoint(cfg, it + 1):
            tensors, meta = hooks.shared_state() if hooks.shared_state is not None else ({}, {})
            run.save(accelerator, output_dir, it + 1, cfg, shared_tensors=tensors, meta=meta)
    return run.history


def update_diagnostics_before(task: Task, policy: nn.Module, scheduler, data: RolloutBatch,
                              cfg: GRPOConfig) -> dict:
    """Gradient agreement of the two halves of the groups (per step bucket), per-step gradient norms,
    and the state needed to measure the update's movement (``diffgrpo.diagnostics``). Draws nothing
    from the run's random streams, so a run with diagnostics samples what one without them does."""
    steps = data.trajectory.is_stochastic.nonzero().flatten().tolist()
    rows = slice(0, min(cfg.micro_batch_size, 16, data.trajectory.states.shape[0]))
    return {"logs": gradient_agreement(task, policy, scheduler, data, cfg=cfg, steps=steps),
            "means": step_means(task, policy, scheduler, data, cfg=cfg, rows=rows, steps=steps),
            "rows": rows, "steps": steps, "theta": parameter_vector(policy)}


def update_diagnostics_after(task: Task, policy: nn.Module, scheduler, data: RolloutBatch, cfg: GRPOConfig,
                             before: dict, theta_start) -> dict[str, float]:
    """Add the update's movement: per-step KL(new || old) on up to 16 stored chains, ||delta theta|| / ||theta||,
    and ||theta - theta_start|| / ||theta_start|| (theta_start: the weights when this call began)."""
    after = step_means(task, policy, scheduler, data, cfg=cfg, rows=before["rows"], steps=before["steps"])
    theta = parameter_vector(policy)
    return {**before["logs"], **policy_movement(before["means"], after, reduction=cfg.sampler.log_prob_reduction),
            "policy/relative_step": float((theta - before["theta"]).norm() / before["theta"].norm()),
            "policy/drift_since_start": float((theta - theta_start).norm() / theta_start.norm())}


def group_id_offset(iteration: int, process_index: int, num_processes: int, conditions_per_iteration: int) -> int:
    """First group id of this process's groups in this iteration: unique over iterations and processes."""
    return (iteration * num_processes + process_index) * conditions_per_iteration


def _mean_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the processes that report it; a non-finite value makes it NaN.

    Why one gather of the whole dict rather than a collective per key: a process may lack a key
    (no loss term of its own this iteration, every group dropped), and a collective per key would
    then pair different keys across processes, or wait forever.
    """
    if accelerator.num_processes == 1:
        return {k: float(v) for k, v in values.items()}
    reported = gather_object([dict(values)])  # one dict per process, in rank order
    keys = dict.fromkeys(k for d in reported for k in d)
    return {k: float(torch.tensor([float(d[k]) if math.isfinite(d[k]) else float("nan")
                                   for d in reported if k in d]).mean()) for k in keys}
