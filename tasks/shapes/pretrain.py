"""Pretrain the shapes prior: flow matching of a tiny UNet that draws the requested disc.

Importable (other recipes and the tests run it); ``recipes/pretrain_shapes.py`` is its command line.

Why a pretraining recipe: GRPO fine-tunes a model that already roughly solves the task. This one
trains for a few minutes on two CPU cores to a prior that draws recognisable but imperfect discs
(held-out IoU well below 1), so that GRPO on the shapes task has room to improve.

Flow matching (rectified flow): with x0 the target image, noise ~ N(0, I) and sigma ~ U(0, 1),
x_t = (1 - sigma) x0 + sigma noise, and the network regresses the velocity v = noise - x0 at
timestep t = sigma * num_train_timesteps (the diffusers FlowMatchEulerDiscrete convention).

Run:  python recipes/pretrain_shapes.py            (or: accelerate launch recipes/pretrain_shapes.py)
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffgrpo.chain import SamplingChain
from diffgrpo.checkpoint import git_revision
from diffgrpo.config import SamplerConfig
from diffgrpo.evaluate import evaluate
from diffgrpo.rng import make_generator
from diffgrpo.task import batch_to
from tasks.shapes.model import ShapesModelConfig, build_model, save_prior
from tasks.shapes.task import ShapesTask, ShapesTaskConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Flow-matching pretraining of the shapes UNet."""

    seed: int = 0
    """Seeds the initial weights and every draw of examples, noise and sigma."""
    steps: int = 120
    """Optimiser steps. The default is deliberately short: the prior must leave room for GRPO."""
    batch_size: int = 64
    """Examples per step (drawn with replacement from the train split)."""
    learning_rate: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10 %)."""
    warmup_steps: int = 30
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    output_dir: Path = Path("runs/shapes_prior")
    """Where the UNet (safetensors + config.json), the task config and metrics.json are written."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Passed to accelerate; CPU runs should keep 'no'."""
    log_every: int = 50
    """Steps between loss log lines (mean loss over the window)."""
    eval_batch_size: int = 256
    """Conditions per sampling batch in the held-out evaluation."""
    use_eval: bool = True
    """Sample the test split after training and report IoU / centroid / area errors."""
    use_progress_bar: bool = True
    """Show a tqdm progress bar."""
    num_threads: int | None = None
    """CPU threads for torch (torch.set_num_threads); None keeps torch's default. On a CPU shared
    with other jobs, 1 avoids thread oversubscription, which can slow each step several-fold."""
    task: ShapesTaskConfig = field(default_factory=ShapesTaskConfig)
    model: ShapesModelConfig = field(default_factory=ShapesModelConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1 (or omitted for torch's default), got {self.num_threads}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"--warmup-steps must be in [0, steps={self.steps}), got {self.warmup_steps}")


@dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` produced."""

    model_dir: Path
    """Directory holding the saved prior (load with ``tasks.shapes.model.load_prior``)."""
    losses: tuple[float, ...]
    """Flow-matching loss of every step, in order."""
    test_metrics: dict[str, float]
    """Held-out means, keys '<metric>_ode' (eta = 0) and '<metric>_sde' (eta = 1); empty if use_eval
    is off."""
    seconds: float
    """Wall time of the training loop (without evaluation)."""


def flow_matching_loss(task: ShapesTask, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       generator: torch.Generator) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity noise - x0 (scalar)."""
    x0 = batch["target"]  # (B, 1, S, S)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    sigma = torch.rand(x0.shape[0], generator=generator).to(x0)  # (B,)
    s = sigma[:, None, None, None]
    x_t = (1.0 - s) * x0 + s * noise
    t = sigma * task.cfg.num_train_timesteps
    v_pred = task.predict(model, x_t, t, task.encode_condition(batch))
    return torch.nn.functional.mse_loss(v_pred.float(), (noise - x0).float())


def pretrain(cfg: Config) -> PretrainResult:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    task = ShapesTask(cfg.task)
    model = build_model(cfg.model, cfg.task.image_size_px, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = make_generator(cfg.seed, "pretrain_shapes", accelerator.process_index)
    num_train = task.num_examples("train")

    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(cfg.steps), disable=not (cfg.use_progress_bar and accelerator.is_main_process))
    for step in bar:
        indices = torch.randint(num_train, (cfg.batch_size,), generator=generator)
        batch = batch_to(task.load_examples("train", indices), accelerator.device)
        with accelerator.autocast():
            loss = flow_matching_loss(task, model, batch, generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = losses[-cfg.log_every :]
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            logger.info("step %d loss %.4f", step + 1, sum(window) / len(window))
    seconds = time.perf_counter() - start

    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    metrics: dict[str, float] = {}
    if cfg.use_eval:
        for suffix, eta in (("ode", 0.0), ("sde", 1.0)):
            per_example = evaluate(
                task, unwrapped, SamplingChain.of(task, SamplerConfig(eta=eta)), split="test",
                seed=cfg.seed, batch_size=cfg.eval_batch_size, accelerator=accelerator,
                progress=cfg.use_progress_bar,
            )
            metrics.update({f"{name}_{suffix}": float(value.mean()) for name, value in per_example.items()})

    if accelerator.is_main_process:
        save_prior(unwrapped, cfg.task, cfg.output_dir)
        final_loss = sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :])
        record = {"config": _jsonable(asdict(cfg)), "git_revision": git_revision(), "train_seconds": seconds,
                  "final_loss": final_loss, "test_metrics": metrics}
        (Path(cfg.output_dir) / "metrics.json").write_text(json.dumps(record, indent=2))
    accelerator.wait_for_everyone()
    return PretrainResult(Path(cfg.output_dir), tuple(losses), metrics, seconds)


def _jsonable(value):
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value) if isinstance(value, Path) else value


def main(cfg: Config) -> None:
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)  # process-wide, so set here in the entry point only
    result = pretrain(cfg)
    window = result.losses[-cfg.log_every :]
    print(f"trained {cfg.steps} steps in {result.seconds:.1f} s; final loss (mean of last {len(window)}) "
          f"{sum(window) / len(window):.4f}")
    for name, value in result.test_metrics.items():
        print(f"  test {name}: {value:.4f}")
    print(f"saved to {result.model_dir}")

