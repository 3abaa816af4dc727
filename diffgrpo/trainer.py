"""The GRPO training loop for any `Task`: Algorithm 1 of MotionGRPO, top to bottom.

Why a plain function and not a Trainer class: every line of the loop is visible here and calls
one library piece. A task that needs more (a learned reward trained between updates, say)
writes its own recipe from the same pieces instead of adding flags to this one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffgrpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffgrpo.config import GRPOConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import make_generator
from diffgrpo.stream import IndexStream
from diffgrpo.task import Task, batch_to
from diffgrpo.train_step import collect, diversity, frozen_copy, make_perturber, policy_update

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
    output_dir = Path(output_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    scheduler = task.make_scheduler()
    rewards = RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    perturber = make_perturber(cfg)
    optimizer, lr_schedule = make_optimizer(model, cfg)
    reference = frozen_copy(model) if cfg.loss.kl_coef > 0 else None
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = IndexStream(task.num_examples("train"), cfg.seed, rank, world)
    generator = make_generator(cfg.seed, "rollout", rank, device=accelerator.device)
    start = 0
    history: dict[str, list[float]] = {}
    if resume and (path := latest_checkpoint(output_dir)) is not None:
        ckpt = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, lr_scheduler=lr_schedule)
        generator.set_state(ckpt.rank_tensors["rollout_generator"])
        stream.load_state_dict(ckpt.rank_meta["stream"])
        start = ckpt.step
        history = json.loads(ckpt.meta.get("history", "{}"))
        logger.info("resumed from %s at iteration %d", path, start)
    elif resume:
        logger.info("--resume given but %s holds no checkpoint: starting from scratch", output_dir)

    end = cfg.num_iterations if stop_after is None else min(cfg.num_iterations, start + stop_after)
    bar = tqdm(range(start, end), desc="GRPO", disable=not accelerator.is_main_process, initial=start,
               total=cfg.num_iterations)
    for it in bar:
        indices = stream.next(cfg.conditions_per_iteration)                                    # Alg. 1 l.3
        batch = batch_to(task.load_examples("train", indices), accelerator.device)
        offset = (it * world + rank) * cfg.conditions_per_iteration
        data = collect(task, accelerator.unwrap_model(model), scheduler, batch, cfg=cfg,      # l.4-6
                       rewards=rewards, perturber=perturber, generator=generator, group_id_offset=offset,
                       autocast=accelerator.autocast)
        stats = policy_update(task, model, scheduler, data, optimizer, cfg=cfg, generator=generator,  # l.7-9
                              accelerator=accelerator, lr_scheduler=lr_schedule, reference=reference)
        logs = {**stats, **{f"adv/{k}": v for k, v in data.advantages.diagnostics.items()},
                **{f"reward/{k}": float(v.float().mean()) for k, v in data.rewards.items()},
                "diversity/final_samples": diversity(data), "lr": lr_schedule.get_last_lr()[0]}
        logs = {k: _mean_over_processes(accelerator, v) for k, v in logs.items()}
        accelerator.log(logs, step=it + 1)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3g}" for k in logs if k.startswith("reward/")})
        done = it + 1
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.num_iterations:
            save_checkpoint(accelerator, output_dir, done, model=model, optimizer=optimizer, lr_scheduler=lr_schedule,
                            rank_tensors={"rollout_generator": generator.get_state()},
                            rank_meta={"stream": stream.state_dict()},
                            meta={"config": json.dumps(asdict(cfg), default=str), "history": json.dumps(history)})
    return history


def _mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value) if math.isfinite(value) else float("nan")], device=accelerator.device)
    return float(accelerator.gather(t).mean())
