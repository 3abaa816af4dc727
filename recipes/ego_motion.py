"""MotionGRPO: GRPO post-training of the ego-motion prior (the paper's Algorithm 1).

Loads the demo prior (shipped in ``tasks/ego_motion/assets``; or ``--prior``), evaluates it on
the held-out CMU windows, post-trains it with GRPO and evaluates again, with and without
test-time optimisation. Per iteration: perturb each group member's head translation with Perlin
noise, sample G motions per head trajectory from one shared initial noise, score them with the
joint-level rewards and the learned perceptual reward, normalise each sub-reward within its
group, update the policy, then train the perceptual model on this iteration's hard negatives.

    accelerate launch recipes/ego_motion.py                               # the main job
    accelerate launch recipes/ego_motion.py --resume                      # continue a killed run
    accelerate launch --multi_gpu --num_processes 2 recipes/ego_motion.py # two ranks (CPU or GPU)

Writes into ``--output-dir``: results.json ({"base", "grpo", "base+tto", "grpo+tto", "config"}),
results.md, curves.png (sub-rewards, group std per sub-reward, zero-std fraction, diversity),
checkpoints/ and TensorBoard logs/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from tqdm.auto import tqdm

import tasks.ego_motion.rewards  # noqa: F401  (registers the ego_* rewards)
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, StepSelectionConfig
from diffgrpo.launch import make_accelerator
from diffgrpo.plots import plot_history
from diffgrpo.rewards import RewardSet, RewardSpec
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import iteration_logs, parse_reward_specs, should_checkpoint, start_run
from tasks.ego_motion.network import load_denoiser
from tasks.ego_motion.perceptual import PerceptualConfig, PerceptualTrainer
from tasks.ego_motion.sampling import evaluate_windows
from tasks.ego_motion.task import DEMO_PRIOR_PATH, METRIC_UNITS, EgoMotionTask, EgoMotionTaskConfig

logger = logging.getLogger("recipes.ego_motion")


def default_grpo() -> GRPOConfig:
    return GRPOConfig(
        num_iterations=30,
        conditions_per_iteration=8,
        group_size=8,
        micro_batch_size=64,
        steps=StepSelectionConfig(mode="all"),
        perturb=PerturbConfig(name="perlin", scale=0.03, frequency=1.0 / 32.0),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=0),
        rewards=("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel"),
        checkpoint_every=5,
    )


@dataclass(frozen=True)
class Config:
    """MotionGRPO on the ego-motion task."""

    output_dir: Path = Path("runs/ego_motion")
    prior: Path = DEMO_PRIOR_PATH
    """Denoiser weights (safetensors with its config), e.g. from recipes/pretrain_ego_motion.py."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    use_visual_reward: bool = True
    """Add the learned perceptual reward R_vis = exp(omega_vis * s) as a sub-reward."""
    omega_vis: float = 1.0
    """omega_vis of R_vis; scores s lie in [-1, 1]."""
    perceptual_steps: int = 1
    """Perceptual-model updates per GRPO iteration (InfoNCE against the last 3 steps' x0)."""
    eval_seed: int = 1234
    """Seed of the held-out sampling noise (the same for the prior and the post-trained model)."""
    eval_max_windows: int | None = None
    """Evaluate on at most this many test windows (None: all)."""
    use_tto: bool = True
    """Also report every metric after test-time optimisation."""
    threads: int = 1
    """torch CPU threads per process (0: torch's default). 1 is fastest on a 2-core machine shared with other
    work; raise it on a dedicated many-core machine."""
    task: EgoMotionTaskConfig = field(default_factory=EgoMotionTaskConfig)
    grpo: GRPOConfig = field(default_factory=default_grpo)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)


def hard_negatives(task: EgoMotionTask, data, batch: dict, group_size: int) -> torch.Tensor:
    """(B, 3, T, 22, 3): the first member's x0 predictions at the last 3 sampling steps, as bodies on
    the *unperturbed* head (so they differ from the truth only by the policy's own errors)."""
    x0_last = data.trajectory.x0_preds[::group_size, -3:]  # (B, 3, T, D)
    return task.decode_x0(x0_last, batch)["joints_world"]


def evaluate_all(task, model, cfg: Config) -> dict[str, dict[str, float]]:
    result = evaluate_windows(task, model, "test", seed=cfg.eval_seed, use_tto=cfg.use_tto,
                              max_windows=cfg.eval_max_windows, sampler_cfg=task.sampler_config())
    names = {"base": "", "tto": "+tto"}
    return {names[v]: {k: float(x.mean()) for k, x in m.items()} for v, m in result.metrics.items()}


def main(cfg: Config) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.output_dir, mixed_precision=cfg.grpo.mixed_precision)
    accelerator.init_trackers("ego_motion", config={"seed": cfg.grpo.seed})
    task = EgoMotionTask(cfg.task)
    model = load_denoiser(cfg.prior, device=accelerator.device)
    scheduler = task.make_scheduler()
    grpo = dataclasses.replace(cfg.grpo, sampler=task.sampler_config())
    perceptual = PerceptualTrainer(cfg.perceptual, device=accelerator.device) if cfg.use_visual_reward else None
    specs = [RewardSpec(name, weight) for name, weight in parse_reward_specs(grpo.rewards).items()]
    if perceptual is not None:
        specs.append(RewardSpec("ego_visual", 1.0, {"scorer": perceptual, "omega": cfg.omega_vis}))
    rewards = RewardSet.from_specs(specs)
    perturber = make_perturber(grpo)

    base = evaluate_all(task, model, cfg) if accelerator.is_main_process else {}
    run, ckpt = start_run(task, model, grpo, accelerator=accelerator, output_dir=cfg.output_dir, resume=cfg.resume)
    if ckpt is not None and perceptual is not None:
        perceptual.load_state_dict(ckpt.shared_tensors, json.loads(ckpt.meta["perceptual"]))
    rank, world = accelerator.process_index, accelerator.num_processes
    start_time = time.perf_counter()
    bar = tqdm(range(run.start, grpo.num_iterations), desc="MotionGRPO", initial=run.start,
               total=grpo.num_iterations, disable=not accelerator.is_main_process)
    for it in bar:
        batch = batch_to(task.load_examples("train", run.stream.next(grpo.conditions_per_iteration)),  # Alg.1 l.3
                         accelerator.device)
        offset = (it * world + rank) * grpo.conditions_per_iteration
        data = collect(task, accelerator.unwrap_model(run.model), scheduler, batch, cfg=grpo,   # l.4-6: perturb,
                       rewards=rewards, perturber=perturber, generator=run.generator,           # sample, score,
                       group_id_offset=offset, autocast=accelerator.autocast)                   # normalise
        stats = policy_update(task, run.model, scheduler, data, run.optimizer, cfg=grpo,        # l.7-9
                              generator=run.generator, accelerator=accelerator,
                              lr_scheduler=run.lr_schedule, reference=run.reference)
        if perceptual is not None:                                                              # l.10: R_vis
            negatives = hard_negatives(task, data, batch, grpo.group_size)
            for _ in range(cfg.perceptual_steps):
                p_stats = perceptual.train_step(batch["joints_world"], batch["T_world_cpf"], negatives)
            stats.update({f"perceptual/{k}": float(v) for k, v in p_stats.items()})
        logs = run.log(accelerator, it, iteration_logs(data, stats, run.lr_schedule.get_last_lr()[0]))
        bar.set_postfix({k.split("/")[-1]: f"{logs[k]:.3f}" for k in logs if k.startswith("reward/")})
        if should_checkpoint(grpo, it + 1):
            state = perceptual.state_dict() if perceptual is not None else None
            run.save(accelerator, cfg.output_dir, it + 1, grpo,
                     shared_tensors=state.tensors if state is not None else None,
                     meta={"perceptual": json.dumps(state.meta if state is not None else {})})
    train_seconds = time.perf_counter() - start_time
    accelerator.end_training()
    if not accelerator.is_main_process:
        return {}

    post = evaluate_all(task, accelerator.unwrap_model(run.model), cfg)
    results = {"base": base[""], "grpo": post[""], "train_seconds": train_seconds,
               "seconds_per_iteration": train_seconds / max(grpo.num_iterations - run.start, 1),
               "num_processes": world, "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}
    if cfg.use_tto:
        results.update({"base+tto": base["+tto"], "grpo+tto": post["+tto"]})
    write_results(cfg.output_dir, results, run.history)
    return results


def write_results(output_dir: Path, results: dict, history: dict[str, list[float]]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "history.json").write_text(json.dumps(history))
    variants = [v for v in ("base", "grpo", "base+tto", "grpo+tto") if v in results]
    lines = ["| metric (held-out CMU windows) | " + " | ".join(variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for name, unit in METRIC_UNITS.items():
        lines.append(f"| {name} ({unit}) | " + " | ".join(f"{results[v][name]:.3f}" for v in variants) + " |")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_history(history, output_dir / "curves.png", title="MotionGRPO")
    print("\n".join(lines))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(tyro.cli(Config))
