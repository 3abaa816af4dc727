"""GRPO post-training of the shapes prior: draw the requested disc, scored by overlap.

The second task of diffgrpo, on flow matching. It loads the prior from ``--prior-dir`` (or
pretrains one there first, a few minutes on 2 CPU cores), evaluates it on the held-out
conditions, runs GRPO, evaluates again and writes ``results.json`` / ``results.md`` and a
reward curve into ``--output-dir``.

    accelerate launch recipes/shapes.py                                   # one process
    accelerate launch --multi_gpu --num_processes 2 recipes/shapes.py     # two ranks (CPU or GPU)
    accelerate launch recipes/shapes.py --resume                          # continue a killed run
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tasks.shapes.pretrain as pretrain_shapes
from diffgrpo.chain import SamplingChain
from diffgrpo.cli import parse
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, SamplerConfig
from diffgrpo.evaluate import evaluate
from diffgrpo.launch import make_accelerator
from diffgrpo.plots import plot_history
from diffgrpo.trainer import train_grpo
from tasks.shapes.model import load_prior
from tasks.shapes.task import ShapesTask, ShapesTaskConfig

logger = logging.getLogger("recipes.shapes")


def default_grpo() -> GRPOConfig:
    return GRPOConfig(
        num_iterations=40,
        conditions_per_iteration=8,
        group_size=8,
        micro_batch_size=64,
        perturb=PerturbConfig(name="none"),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0),
        rewards=("shapes_disc",),
        checkpoint_every=10,
    )


@dataclass(frozen=True)
class Config:
    """GRPO on the shapes task."""

    output_dir: Path = Path("runs/shapes")
    """Checkpoints, TensorBoard logs, results.json, results.md and curves go here."""
    prior_dir: Path = Path("runs/shapes_prior")
    """The pretrained prior; made with tasks/shapes/pretrain.py's defaults when missing."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    eval_seed: int = 1234
    """Seed of the held-out sampling noise (the same for the prior and the post-trained model)."""
    eval_batch_size: int = 256
    threads: int = 0
    """torch CPU threads (0: leave torch's default; 1 is faster on a busy 2-core machine)."""
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(eta=0.7, log_prob_reduction="mean"))
    """The flow SDE of the rollouts and the held-out evaluation (``--sampler.*``; ``--grpo.sampler.*`` is a
    deprecated spelling)."""
    grpo: GRPOConfig = field(default_factory=default_grpo)
    pretrain: pretrain_shapes.Config = field(default_factory=pretrain_shapes.Config)


def mean_metrics(per_example: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(values.float().mean()) for name, values in per_example.items()}


def main(cfg: Config) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.output_dir, mixed_precision=cfg.grpo.mixed_precision)
    accelerator.init_trackers("shapes", config={"seed": cfg.grpo.seed})
    if cfg.pretrain.output_dir != pretrain_shapes.Config().output_dir:
        raise ValueError("--pretrain.output-dir is not used by this recipe (the prior goes to --prior-dir); pass "
                         "--prior-dir instead")
    if (cfg.prior_dir / "config.json").exists() and cfg.pretrain != pretrain_shapes.Config():
        raise ValueError(f"--pretrain.* flags were given but {cfg.prior_dir} already holds a prior, so they would be "
                         "ignored; drop them, or pass a new --prior-dir to pretrain with them")
    if not (cfg.prior_dir / "config.json").exists():
        if accelerator.is_main_process:
            logger.info("no prior in %s: pretraining one", cfg.prior_dir)
            pretrain_shapes.pretrain(dataclasses.replace(cfg.pretrain, output_dir=cfg.prior_dir))
        accelerator.wait_for_everyone()
    model, task_kwargs = load_prior(cfg.prior_dir)
    task = ShapesTask(ShapesTaskConfig(**task_kwargs))
    model.to(accelerator.device)
    chain = SamplingChain.of(task, cfg.sampler, eta_flag="--sampler.eta")

    def held_out(m) -> dict[str, float]:
        return mean_metrics(evaluate(task, m, chain, split="test",
                                     seed=cfg.eval_seed, batch_size=cfg.eval_batch_size, accelerator=accelerator,
                                     autocast=accelerator.autocast))

    base = held_out(model)
    start = time.perf_counter()
    history = train_grpo(task, model, cfg.grpo, accelerator=accelerator, output_dir=cfg.output_dir,
                         resume=cfg.resume, chain=chain)
    seconds = time.perf_counter() - start
    post = held_out(accelerator.unwrap_model(model))
    accelerator.end_training()
    results = {"base": base, "grpo": post, "train_seconds": seconds,
               "num_processes": accelerator.num_processes,
               "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "results.json").write_text(json.dumps(results, indent=2))
        rows = [f"| {name} | {base[name]:.4f} | {post[name]:.4f} |" for name in base]
        (cfg.output_dir / "results.md").write_text(
            "| metric (test split) | prior | GRPO |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        plot_history(history, cfg.output_dir / "curves.png", title="shapes GRPO")
        for name in base:
            print(f"{name:>24s}  prior {base[name]:.4f}  ->  GRPO {post[name]:.4f}")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(parse(Config, renamed={"--grpo.sampler.": "--sampler."}))
