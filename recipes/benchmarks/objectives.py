"""The four objectives side by side at equal CPU time: probe reward against training CPU seconds, and gradient signal.

One call trains one (task, objective, seed) until its training has spent ``--budget-cpu-s`` CPU seconds and
writes one results file; ``recipes/benchmarks/objectives_table.py`` turns the files into the table of
``docs/objectives.md``. Run every combination one at a time, one thread each, from the repository root
(``-m``: the text-to-image setup imports ``recipes.text_to_image``):

    python -m recipes.benchmarks.objectives --task shapes --objective nft --seed 0 \\
        --output docs/data/objectives_shapes_nft_seed0.json
    python -m recipes.benchmarks.objectives --task text_to_image --objective awm --seed 2 \\
        --output docs/data/objectives_text_to_image_awm_seed2.json
    python -m recipes.benchmarks.objectives --task ego_motion --objective ratio --seed 0 \\
        --output docs/data/objectives_ego_motion_ratio_seed0.json

What is measured, per run:

- **CPU seconds of training** (``time.process_time`` of this single-threaded process, summed over the GRPO
  iterations: rollouts, rewards and updates). Wall-clock time misleads on a shared machine; CPU time much
  less, though not entirely (other jobs share caches and memory bandwidth; docs/objectives.md). The probe
  evaluations and the weight snapshots they need are excluded: they cost every objective alike and are
  measurement, not training.
- **Probe reward**: at each fraction in ``--marks`` of the budget, the weights of the iteration whose training
  CPU seconds are nearest it (the one crossing it or the one before) are snapshotted, and every snapshot is
  evaluated afterwards on the probe set (16 conditions of the *train* split x 4 fixed noises, the same tuples
  for every snapshot; ``diffgrpo.probe``): the paired difference to the prior with its 95 % interval over
  conditions. The probe is drawn from the training distribution, never from the test split. The ego task
  probes as its main job does: 16 post_train windows (its training split) and the 9 validation windows x 4
  noises on the evaluation chain (K = 30), which adds the validation MPJPE the job selects on.
- **Same-condition gradient cosine** at the prior: two independent rollouts (other initial noise, step
  noise and, for NFT and AWM, forward noise) of the same B conditions, the objective's update gradient of
  each, and their cosine. Two estimates of one expected gradient have cosine ~ SNR^2 / (1 + SNR^2)
  (``diffgrpo.diagnostics``), so it says how much of one update is signal. The ratio and x0-regression
  gradients are ``diffgrpo.diagnostics.policy_gradients`` weighted over the trained steps as the update
  weighs them; the NFT and AWM gradients are ``diffgrpo.diagnostics.forward_gradients``, on the update's own
  forward-process terms (``diffgrpo.forward_update``).

Every objective runs with its own library defaults and the task's GRPO settings (learning rate included),
untuned; the KL guards are off (``kl_coef = 0``, the default). DiffusionNFT's gradient at the prior is
on-policy (old policy = trained weights), as in its first update.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import tyro
from accelerate import Accelerator
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, ProbeConfig, SamplerConfig, SelectionConfig
from diffgrpo.diagnostics import cosine, forward_gradients, policy_gradients
from diffgrpo.ema import ParameterEMA
from diffgrpo.loss import FORWARD_OBJECTIVES, LossConfig, select_steps
from diffgrpo.probe import evaluate_probe, probe_indices, probe_logs
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import RandomStreams
from diffgrpo.task import Task, batch_to
from diffgrpo.train_step import RolloutBatch, collect, make_perturber, step_weights
from diffgrpo.trainer import LoopHooks, parse_reward_specs, train_grpo

Objective = Literal["ratio", "x0_regression", "nft", "awm"]
TaskName = Literal["shapes", "text_to_image", "ego_motion"]

DEFAULT_BUDGET_CPU_S = {"shapes": 90.0, "text_to_image": 75.0, "ego_motion": 135.0}
"""Training CPU seconds per run (one thread), by task. How many iterations each objective gets in it is measured,
not fixed: the iterations column of the table in docs/objectives.md."""
DEFAULT_MARKS = (1 / 9, 2 / 9, 1 / 3, 4 / 9, 2 / 3, 1.0)
"""Fractions of the budget at which the probe is taken; 1/3 is the "a third of the CPU time" of issue 21."""
PROBE = ProbeConfig(splits=("train",), conditions_per_split=16, noises_per_condition=4, eval_every=1)
"""The probe set: 16 train-split conditions x 4 fixed noises (``eval_every`` unused here)."""


@dataclass(frozen=True)
class Config:
    """One (task, objective, seed) run of the equal-CPU-time comparison."""

    task: TaskName
    objective: Objective
    seed: int
    output: Path
    """Results JSON (e.g. docs/data/objectives_shapes_nft_seed0.json)."""
    budget_cpu_s: float | None = None
    """Training CPU seconds (default: DEFAULT_BUDGET_CPU_S of the task)."""
    marks: tuple[float, ...] = DEFAULT_MARKS
    """Fractions of the budget at which the weights are snapshotted for the probe (increasing, last 1)."""
    work_dir: Path = Path("runs/objectives")
    """Checkpoint folder of the runs and the tiny text-to-image pipeline."""

    def __post_init__(self) -> None:
        if self.budget_cpu_s is not None and self.budget_cpu_s <= 0:
            raise ValueError(f"--budget-cpu-s {self.budget_cpu_s} must be > 0")
        if not self.marks or list(self.marks) != sorted(set(self.marks)) or self.marks[0] <= 0 or self.marks[-1] != 1:
            raise ValueError(f"--marks {self.marks} must increase strictly within (0, 1] and end at 1")


@dataclass(frozen=True)
class Setup:
    """What one run trains and probes: the task, the model, the rollout chain, the GRPO settings, and the probe
    set with the chain it samples (None: the rollout chain)."""

    task: Task
    model: nn.Module
    chain: SamplingChain
    grpo: GRPOConfig
    probe: ProbeConfig = PROBE
    probe_chain: SamplingChain | None = None


def shapes_setup(objective: str, seed: int) -> Setup:
    """The shapes prior (``runs/shapes_prior``, from ``recipes/shapes.py``) with the shapes recipe's GRPO
    settings: B = 8 conditions x G = 8, learning rate 1e-4, the flow SDE at eta 0.7."""
    from tasks.shapes.model import load_prior
    from tasks.shapes.task import ShapesTask, ShapesTaskConfig

    prior = Path("runs/shapes_prior")
    if not (prior / "shapes_task.json").exists():
        raise FileNotFoundError(f"{prior} holds no shapes prior; run python recipes/shapes.py first (it pretrains one)")
    model, kwargs = load_prior(prior)
    task = ShapesTask(ShapesTaskConfig(**kwargs))
    chain = SamplingChain.of(task, SamplerConfig(eta=0.7, log_prob_reduction="mean"))
    grpo = GRPOConfig(seed=seed, num_iterations=100_000, conditions_per_iteration=8, group_size=8,
                      micro_batch_size=64, perturb=PerturbConfig(name="none"),
                      optim=OptimConfig(learning_rate=1e-4), rewards=("shapes_disc",), checkpoint_every=0,
                      loss=LossConfig(objective=objective))
    return Setup(task, model, chain, grpo)


def text_to_image_setup(objective: str, seed: int, work_dir: Path) -> Setup:
    """The tiny random 32 px SD3-layout pipeline (flow matching, velocity prediction; ``--tiny-pipeline sd3``)
    with the settings of the text-to-image CPU demonstration (docs/text_to_image.md): rank-8 LoRA on the
    attention projections and ``proj_out``, 8 steps of the flow SDE at eta 0.7, guidance 4.5, B = 4 prompts
    x G = 8, learning rate 1e-2, JPEG compressibility."""
    from diffgrpo.lora import LoRAConfig, add_lora
    from recipes.text_to_image import TEST_PROMPTS, TRAIN_PROMPTS, load_pipeline
    from recipes.text_to_image import Config as RecipeConfig
    from tasks.text_to_image import rewards as _image_rewards  # noqa: F401  (registers jpeg_compressibility)
    from tasks.text_to_image.task import TextToImageTask, TextToImageTaskConfig
    from tasks.text_to_image.tiny import save_tiny_pipeline

    folder = work_dir / "tiny_sd3_32px"
    if not (folder / "model_index.json").exists():
        save_tiny_pipeline("sd3", folder, image_size_px=32)
    pipeline = load_pipeline(RecipeConfig(pipeline=str(folder), drop_text_encoder_3=True))
    pipeline.set_progress_bar_config(disable=True)
    task = TextToImageTask(pipeline, {"train": TRAIN_PROMPTS, "test": TEST_PROMPTS},
                           TextToImageTaskConfig(num_inference_steps=8, max_sequence_length=8))
    chain = SamplingChain.of(task, SamplerConfig(eta=0.7, guidance_scale=4.5, log_prob_reduction="mean"))
    for component in pipeline.components.values():
        if isinstance(component, nn.Module):
            component.requires_grad_(False)
    model = task.denoiser
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapters' random A matrices
        add_lora(model, LoRAConfig(use_lora=True, target_modules=("to_q", "to_k", "to_v", "to_out.0", "proj_out")))
    grpo = GRPOConfig(seed=seed, num_iterations=100_000, conditions_per_iteration=4, group_size=8,
                      micro_batch_size=16, optim=OptimConfig(learning_rate=1e-2, weight_decay=0.0),
                      rewards=("jpeg_compressibility",), checkpoint_every=0, loss=LossConfig(objective=objective))
    return Setup(task, model, chain, grpo)


def ego_motion_setup(objective: str, seed: int) -> Setup:
    """The ego-motion main job's run (``tasks/ego_motion/grpo.py``) with the joint rewards only: the shipped demo
    prior (``DEMO_PRIOR_PATH``), ``default_grpo()`` (B = 8 post-train windows x G = 8, Adam lr 2e-5, Perlin head
    perturbation 0.3 m, every rollout step trained by the step objectives), the job's rollout chain (EgoAllo's
    sampler at eta 0.8, K = 10) and its probe (16 post-train and the 9 validation windows x 4 fixed noises on the
    evaluation chain, K = 30). Rewards: ego_rot, ego_pos, ego_pa_pos and ego_vel. The perceptual reward is left
    out: its model trains online on each iteration's samples, so the reward would move during the comparison
    (and differently per objective). ``diagnostics_every`` is 0 for every objective (the in-loop diagnostics
    are measurement, not training, and would cost each objective differently); the job's in-loop probe, checkpoints and
    selection are off (this benchmark probes its snapshots afterwards)."""
    import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
    from tasks.ego_motion.grpo import Config as JobConfig
    from tasks.ego_motion.model.network import load_denoiser
    from tasks.ego_motion.task import EgoMotionTask

    job = JobConfig(use_perceptual_reward=False)
    task = EgoMotionTask(job.task)
    model = load_denoiser(job.prior, device="cpu")
    grpo = replace(job.grpo, seed=seed, num_iterations=100_000, loss=LossConfig(objective=objective),
                   diagnostics_every=0, checkpoint_every=0, probe=ProbeConfig(eval_every=0),
                   selection=SelectionConfig())
    probe = replace(job.grpo.probe, eval_every=1)  # eval_every unused here; the job's sets and seed
    return Setup(task, model, job.rollout_chain(), grpo, probe=probe, probe_chain=task.sampling_chain())


def update_gradient(task: Task, model: nn.Module, chain: SamplingChain, data: RolloutBatch, *, cfg: GRPOConfig,
                    generator: torch.Generator) -> Tensor:
    """The gradient of one update's loss on all of ``data``'s rows, at the current weights, as a flat float32 vector.

    'ratio' / 'x0_regression': ``policy_gradients`` per trained step (``cfg.steps``, drawn by ``generator``),
    averaged with the update's step weights. 'nft' / 'awm': ``forward_gradients`` with its forward noise drawn
    by ``generator``; NFT's old policy is the current weights (its first update). Nothing is accumulated in ``.grad``.
    """
    traj = data.trajectory
    rows = slice(0, traj.states.shape[0])
    if cfg.loss.objective in FORWARD_OBJECTIVES:
        old = ParameterEMA(model, 0.0) if cfg.loss.objective == "nft" else None
        return forward_gradients(task, model, chain, data, cfg=cfg, generator=generator,
                                 row_sets=[torch.arange(rows.stop)], old_policy=old)[0]
    trained = select_steps(traj.num_steps, cfg.steps.mode, fraction=cfg.steps.fraction, window=cfg.steps.window,
                           generator=generator, is_stochastic=traj.is_stochastic.cpu())
    steps = trained.nonzero().flatten().tolist()
    per_step = policy_gradients(task, model, chain, data, cfg=cfg, row_sets=[torch.arange(rows.stop)],
                                steps=steps)[0]
    weight = step_weights(traj, steps, cfg.step_weighting)  # mean 1 over the steps, as the update weighs them
    return sum(weight[k] * per_step[k] for k in steps) / len(steps)


def same_condition_cosine(setup: Setup, rewards: RewardSet, seed: int) -> float:
    """Cosine of the update gradients of two independent rollouts of the same B train conditions at the
    current weights (see the module docstring); the conditions, rollouts and noisings are seeded by ``seed``."""
    task, grpo = setup.task, setup.grpo
    indices = probe_indices(task.num_examples(grpo.train_split), grpo.conditions_per_iteration, seed, "grad_signal")
    batch = batch_to(task.load_examples(grpo.train_split, indices), "cpu")
    grads = []
    for draw in (0, 1):
        data = collect(task, setup.model, setup.chain, batch, cfg=grpo, rewards=rewards,
                       perturber=make_perturber(grpo), generator=RandomStreams.from_seed(1000 * seed + draw),
                       group_id_offset=0)
        grads.append(update_gradient(task, setup.model, setup.chain, data, cfg=grpo,
                                     generator=torch.Generator().manual_seed(1000 * seed + draw)))
    return cosine(*grads)


class BudgetSpent(Exception):
    """Raised by the after-update hook once the training CPU budget is spent: ``train_grpo`` runs a fixed
    number of iterations, and the comparison needs equal CPU time instead."""


def train_for_cpu_budget(setup: Setup, rewards: RewardSet, budget_s: float, marks: tuple[float, ...],
                         output_dir: Path) -> tuple[list[dict], list[tuple[int, float, dict[str, Tensor]]]]:
    """Train until ``budget_s`` training CPU seconds; returns per iteration {iteration, train_cpu_s, reward}
    and, per mark (``marks`` fractions of the budget), (iteration, its training CPU seconds, the trainable
    weights after it) of the iteration whose CPU seconds are nearest the mark."""
    model = setup.model
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    iterations: list[dict] = []
    snapshots: list[tuple[int, float, dict[str, Tensor]]] = []
    previous = None
    excluded = 0.0  # CPU seconds of the snapshots, not training
    start = time.process_time()

    def after_update(it: int, data: RolloutBatch, batch) -> dict[str, float]:
        nonlocal excluded, previous
        spent = time.process_time() - start - excluded
        iterations.append({"iteration": it + 1, "train_cpu_s": spent,
                           "reward": {name: float(value.mean()) for name, value in data.rewards.items()}})
        tick = time.process_time()
        params = dict(model.named_parameters())
        current = (it + 1, spent, {name: params[name].detach().clone() for name in trainable})
        while len(snapshots) < len(marks) and spent >= marks[len(snapshots)] * budget_s:
            # the iteration nearest to the mark: the one crossing it or the one before
            target = marks[len(snapshots)] * budget_s
            nearest = previous if previous is not None and target - previous[1] < spent - target else current
            snapshots.append(nearest)
        previous = current
        excluded += time.process_time() - tick
        if len(snapshots) == len(marks):
            raise BudgetSpent
        return {}
    try:
        train_grpo(setup.task, model, setup.grpo, accelerator=Accelerator(cpu=True), output_dir=output_dir,
                   rewards=rewards, hooks=LoopHooks(after_update=after_update), chain=setup.chain)
    except BudgetSpent:
        pass
    return iterations, snapshots


def probe_at(setup: Setup, rewards: RewardSet, weights: list[dict[str, Tensor]]) -> tuple[dict, list[dict]]:
    """Probe values of the current (prior) weights, then the paired differences of each of ``weights``."""
    def evaluate() -> dict[str, Tensor]:
        return evaluate_probe(setup.task, setup.model, setup.probe_chain or setup.chain, setup.probe, rewards=rewards,
                              micro_batch_size=setup.grpo.micro_batch_size)

    baseline = evaluate()
    prior_logs = probe_logs(baseline, None)
    out = []
    for snapshot in weights:
        setup.model.load_state_dict(snapshot, strict=False)
        out.append(probe_logs(evaluate(), baseline))
    return prior_logs, out


def build_setup(cfg: Config) -> Setup:
    """The setup of ``cfg.task`` for ``cfg.objective`` and ``cfg.seed``."""
    if cfg.task == "shapes":
        return shapes_setup(cfg.objective, cfg.seed)
    if cfg.task == "text_to_image":
        return text_to_image_setup(cfg.objective, cfg.seed, cfg.work_dir)
    return ego_motion_setup(cfg.objective, cfg.seed)


def main(cfg: Config) -> dict:
    torch.set_num_threads(1)
    setup = build_setup(cfg)
    rewards = RewardSet.from_specs(parse_reward_specs(setup.grpo.rewards))
    budget = cfg.budget_cpu_s or DEFAULT_BUDGET_CPU_S[cfg.task]
    tick = time.process_time()
    grad_cosine = same_condition_cosine(setup, rewards, cfg.seed)
    cosine_cpu_s = time.process_time() - tick
    prior = {name: p.detach().clone() for name, p in setup.model.named_parameters() if p.requires_grad}
    run_dir = cfg.work_dir / f"{cfg.task}_{cfg.objective}_seed{cfg.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a cut-off attempt's folder: this run starts afresh
    iterations, snapshots = train_for_cpu_budget(setup, rewards, budget, cfg.marks, run_dir)
    setup.model.load_state_dict(prior, strict=False)
    prior_logs, probes = probe_at(setup, rewards, [weights for _, _, weights in snapshots])
    result = {
        "command": f"python -m recipes.benchmarks.objectives --task {cfg.task} --objective {cfg.objective} "
                   f"--seed {cfg.seed} --output {cfg.output}",
        "task": cfg.task, "objective": cfg.objective, "seed": cfg.seed, "budget_cpu_s": budget,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "grad_cosine": grad_cosine, "grad_cosine_cpu_s": cosine_cpu_s,
        "probe": {"config": asdict(setup.probe), "prior": prior_logs,
                  "marks": [{"fraction": mark, "iteration": iteration, "train_cpu_s": spent, **logs}
                            for mark, (iteration, spent, _), logs in zip(cfg.marks, snapshots, probes, strict=True)]},
        "iterations": iterations,
    }
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(tyro.cli(Config))
