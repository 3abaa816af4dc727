"""The GRPO training loop for any `Task`: Algorithm 1 of MotionGRPO, top to bottom.

Why a plain function and not a Trainer class: every line of the loop is visible here and calls
one library piece. A task that needs more (a learned reward trained between updates, say)
writes its own recipe from the same pieces instead of adding flags to this one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffgrpo.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from diffgrpo.config import GRPOConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import make_generator
from diffgrpo.stream import IndexStream
from diffgrpo.task import Task, batch_to
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
    generator: torch.Generator
    """This process's stream for perturbations, initial noise, step noise and step selection."""
    reference: nn.Module | None
    """Frozen copy of the starting policy for the KL term (None without KL)."""
    start: int = 0
    """Iterations already done (> 0 after a resume)."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """Logged scalars of every iteration so far, restored on resume."""

    def log(self, accelerator, iteration: int, values: dict[str, float]) -> dict[str, float]:
        """Average ``values`` over processes, send them to the trackers and the history."""
        values = {k: _mean_over_processes(accelerator, v) for k, v in values.items()}
        accelerator.log(values, step=iteration + 1)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        return values

    def save(self, accelerator, output_dir: str | Path, done: int, cfg, *,
             shared_tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> None:
        """Checkpoint after ``done`` iterations (every process must call this)."""
        save_checkpoint(accelerator, output_dir, done, model=self.model, optimizer=self.optimizer,
                        lr_scheduler=self.lr_schedule, rank_tensors={"rollout_generator": self.generator.get_state()},
                        rank_meta={"stream": self.stream.state_dict()}, shared_tensors=shared_tensors,
                        meta={"config": json.dumps(asdict(cfg), default=str), "history": json.dumps(self.history),
                              **(meta or {})})


def start_run(task: Task, model: nn.Module, cfg: GRPOConfig, *, accelerator, output_dir: str | Path,
              resume: bool = False) -> tuple[GRPORun, Checkpoint | None]:
    """Optimiser, schedule, data stream and RNG for a run; restored from the newest checkpoint if ``resume``.

    Returns the run and the checkpoint it resumed from (None for a fresh start), so a recipe can
    restore its own extra state (e.g. a learned reward model) from ``checkpoint.shared_tensors``.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    optimizer, lr_schedule = make_optimizer(model, cfg)
    reference = frozen_copy(model) if cfg.loss.kl_coef > 0 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    run = GRPORun(model=model, optimizer=optimizer, lr_schedule=lr_schedule,
                  stream=IndexStream(task.num_examples("train"), cfg.seed, rank, world),
                  generator=make_generator(cfg.seed, "rollout", rank, device=accelerator.device), reference=reference)
    ckpt = None
    if resume and (path := latest_checkpoint(output_dir)) is not None:
        ckpt = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, lr_scheduler=lr_schedule)
        run.generator.set_state(ckpt.rank_tensors["rollout_generator"])
        run.stream.load_state_dict(ckpt.rank_meta["stream"])
        run.start = ckpt.step
        run.history = json.loads(ckpt.meta.get("history", "{}"))
        logger.info("resumed from %s at iteration %d", path, run.start)
    elif resume:
        logger.info("--resume given but %s holds no checkpoint: starting from scratch", output_dir)
    return run, ckpt


def iteration_logs(data: RolloutBatch, stats: dict[str, float], lr: float) -> dict[str, float]:
    """The scalars logged per iteration: loss stats, advantage diagnostics, sub-rewards, diversity."""
    return {**stats, **{f"adv/{k}": v for k, v in data.advantages.diagnostics.items()},
            **{f"reward/{k}": float(v.float().mean()) for k, v in data.rewards.items()},
            "diversity/final_samples": diversity(data), "lr": lr}


def should_checkpoint(cfg: GRPOConfig, done: int) -> bool:
    return bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.num_iterations


def train_grpo(
    task: Task,
    model: nn.Module,
    cfg: GRPOConfig,
    *,
    accelerator,
    output_dir: str | Path,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, list[float]]:
    """Post-train ``model`` on ``task`` for ``cfg.num_iterations`` iterations; returns the logged history.

    ``resume`` continues from the newest checkpoint in ``output_dir`` (bit-identically on CPU).
    ``stop_after`` ends the run after that many iterations *of this call* (used to simulate a
    crash in tests); checkpoints are still written on their usual schedule.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    scheduler = task.make_scheduler()
    rewards = RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    perturber = make_perturber(cfg)
    run, _ = start_run(task, model, cfg, accelerator=accelerator, output_dir=output_dir, resume=resume)
    end = cfg.num_iterations if stop_after is None else min(cfg.num_iterations, run.start + stop_after)
    bar = tqdm(range(run.start, end), desc="GRPO", disable=not accelerator.is_main_process, initial=run.start,
               total=cfg.num_iterations)
    for it in bar:
        indices = run.stream.next(cfg.conditions_per_iteration)                                # Alg. 1 l.3
        batch = batch_to(task.load_examples("train", indices), accelerator.device)
        offset = (it * world + rank) * cfg.conditions_per_iteration
        data = collect(task, accelerator.unwrap_model(run.model), scheduler, batch, cfg=cfg,  # l.4-6
                       rewards=rewards, perturber=perturber, generator=run.generator, group_id_offset=offset,
                       autocast=accelerator.autocast)
        stats = policy_update(task, run.model, scheduler, data, run.optimizer, cfg=cfg,       # l.7-9
                              generator=run.generator, accelerator=accelerator, lr_scheduler=run.lr_schedule,
                              reference=run.reference)
        logs = run.log(accelerator, it, iteration_logs(data, stats, run.lr_schedule.get_last_lr()[0]))
        bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3g}" for k in logs if k.startswith("reward/")})
        if should_checkpoint(cfg, it + 1):
            run.save(accelerator, output_dir, it + 1, cfg)
    return run.history


def _mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value) if math.isfinite(value) else float("nan")], device=accelerator.device)
    return float(accelerator.gather(t).mean())
