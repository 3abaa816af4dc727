"""The MotionGRPO job: GRPO post-training of the ego-motion prior (the paper's Algorithm 1), importable.

Why a module and not only a script: the ablation, RLPF, perceptual-negatives and gradient-signal
recipes run this very job (its config, perceptual model hooks, warm-up, evaluation and results) with other
settings; ``recipes/ego_motion.py`` is its command line. The loop itself is the core's
``diffgrpo.trainer.train_grpo`` (Algorithm 1 with the paper's line numbers); this module adds what
the ego-motion job puts around it: the two sampling chains (rollouts with K = 10, evaluation with
K = 30), the learned perceptual model, and the held-out evaluation before and after.

Loads the demo prior (shipped in ``tasks/ego_motion/assets``; or ``--prior``), evaluates it on
the held-out CMU windows, post-trains it with GRPO on the post-train clips (which the prior never
saw) and evaluates again, with and without test-time optimisation. A fixed probe set (post-train
and validation windows x fixed noises) is evaluated every ``--grpo.probe.eval-every`` iterations, with
paired differences against the prior and their 95 % intervals; the weights with the lowest validation
MPJPE (``--grpo.selection.metric``) are kept in ``best/``. The test windows are read once, at the end:
the prior, the last weights and the selected ones. Per iteration (the one GRPO loop,
``diffgrpo.trainer.train_grpo``): perturb each group member's head translation with Perlin noise,
sample G motions per head trajectory from one shared initial noise, score them with the
joint-level rewards and the learned perceptual reward, normalise each sub-reward within its
group, update the policy, then train the perceptual model on this iteration's hard negatives
(a hook of the loop).

    accelerate launch recipes/ego_motion.py                               # the main job
    accelerate launch recipes/ego_motion.py --resume                      # continue a killed run
    accelerate launch --multi_gpu --num_processes 2 recipes/ego_motion.py # two ranks (CPU or GPU)
    accelerate launch recipes/ego_motion.py --prior egoallo_checkpoint_april13 --task.include-hands  # EgoAllo's
                                          # released prior on AMASS: docs/egoallo_checkpoint.md has the flags

Writes into ``--output-dir``: prior.safetensors (the last weights, which ``--prior`` of every recipe reads;
an EgoAllo prior becomes the folder prior/: ``model.prior_export``), best/ (the selected weights and
best/prior.safetensors), results.json ({"base", "grpo", "grpo_selected", "base+tto", "grpo+tto",
"grpo_selected+tto", "prior", "selected", "config"}), results.md, curves.png (sub-rewards, group std per
sub-reward, zero-std fraction, diversity), checkpoints/ and TensorBoard logs/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
from diffgrpo.chain import SamplingChain
from diffgrpo.checkpoint import latest_checkpoint, load_checkpoint
from diffgrpo.checkpoint_selection import load_selected
from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, ProbeConfig, SelectionConfig, StepSelectionConfig
from diffgrpo.launch import make_accelerator
from diffgrpo.loss import LossConfig
from diffgrpo.plots import plot_history
from diffgrpo.rewards import RewardSet, RewardSpec, parse_reward_params
from diffgrpo.rng import make_generator
from diffgrpo.trainer import LoopHooks, check_run, parse_reward_specs, train_grpo
from tasks.ego_motion.model.egoallo_checkpoint import find_checkpoint_files
from tasks.ego_motion.model.motion import Modality, feature_range
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.model.prior_export import export_prior
from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualTrainer
from tasks.ego_motion.rewards.perceptual_data import (
    NEGATIVE_KINDS,
    NegativeKind,
    prior_joints,
    warm_up_perceptual,
)
from tasks.ego_motion.rewards.perceptual_update import PerceptualUpdate
from tasks.ego_motion.rewards.registered import GROUND_TRUTH_REWARDS
from tasks.ego_motion.sampling.sampler import evaluate_windows
from tasks.ego_motion.task import DEMO_PRIOR_PATH, METRIC_UNITS, EgoMotionTask, EgoMotionTaskConfig

logger = logging.getLogger(__name__)

RENAMED_FLAGS = {"--use-visual-reward": "--use-perceptual-reward",
                 "--no-use-visual-reward": "--no-use-perceptual-reward",
                 "--omega-vis": "--perceptual-omega", "--critic-": "--perceptual-"}
"""Deprecated spellings of this job's flags -> the current ones (``diffgrpo.cli.parse``): the learned reward was
called visual, perceptual and critic; it is now the perceptual reward everywhere (docs/ego_motion_rewards.md)."""


def renamed_flags(prefix: str = "--") -> dict[str, str]:
    """``RENAMED_FLAGS`` for a recipe that nests this job's config, e.g. ``prefix="--base."``."""
    return {prefix + old[2:]: prefix + new[2:] for old, new in RENAMED_FLAGS.items()}


def default_grpo() -> GRPOConfig:
    """The main job's GRPO settings. The objective is the advantage-weighted x0 regression, not the paper's
    ratio: over 3 seeds it is the one that raises the probe reward on the post-train windows beyond its
    interval, and its gradient has signal (same-condition cosine 0.41 against 0.11 for its shuffled-advantage
    null and -0.03 for the ratio; docs/grad_signal.md). The head perturbation is Perlin with lambda = 0.3 m per member:
    the best held-out MPJPE of the 3-seed ablation (docs/results.md: -1.66 %, lower in every seed, against
    -1.36 % at 0.1 and -0.13 % at the paper's 0.03), with PA-MPJPE and foot skating lower in every seed.
    ``--grpo.loss.objective ratio --rollout-sampling-steps 30 --grpo.perturb.scale 0.03`` is the paper's
    plain form."""
    return GRPOConfig(
        num_iterations=30,
        conditions_per_iteration=8,
        group_size=8,
        micro_batch_size=64,
        steps=StepSelectionConfig(mode="all"),
        perturb=PerturbConfig(name="perlin", scale=0.3, frequency=1.0 / 32.0),
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=0),
        loss=LossConfig(objective="x0_regression"),
        rewards=("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel"),
        checkpoint_every=5,
        diagnostics_every=10,
        train_split="post_train",
        probe=ProbeConfig(splits=("post_train", "validation"), conditions_per_split=16, noises_per_condition=4,
                          eval_every=10),
        selection=SelectionConfig(metric="metric/validation/mpjpe_mm", mode="min"),
    )


@dataclass(frozen=True)
class Config:
    """MotionGRPO on the ego-motion task."""

    output_dir: Path = Path("runs/ego_motion")
    prior: Path = DEMO_PRIOR_PATH
    """The prior to post-train: a denoiser .safetensors with its config (recipes/pretrain_ego_motion.py), or
    EgoAllo's released checkpoint folder (model_config.yaml + checkpoints_<N>/; docs/egoallo_checkpoint.md)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    use_perceptual_reward: bool = True
    """Add the learned perceptual reward R_vis = exp(perceptual_omega * s) as a sub-reward."""
    perceptual_omega: float = 1.0
    """perceptual_omega of R_vis; scores s lie in [-1, 1]."""
    reward_params: tuple[str, ...] = ()
    """Factory parameters of the rewards as REWARD.KEY=VALUE, e.g. ``ego_rot.omega=3 ego_pos.omega=20`` (the
    omegas of R = exp(-omega * error)); a key not given keeps the factory's default (docs/ego_motion_rewards.md)."""
    perceptual_steps: int = 1
    """Perceptual-model updates per GRPO iteration (InfoNCE against --perceptual-negatives)."""
    perceptual_negatives: tuple[NegativeKind, ...] = ("x0_last",)
    """What the perceptual model contrasts each condition's truth with (tasks/ego_motion/rewards/perceptual_data.py):
    'x0_last' (the paper's: the first member's x0 at the last 3 steps), 'members' (the other members' final
    samples), 'foreign' (another window's truth moved rigidly under this head)."""
    perceptual_on_own_head: bool = False
    """Decode and score the policy's negatives on the (perturbed) head each chain was sampled for, as the
    perceptual reward scores samples; False: on the clean head, the paper's."""
    perceptual_warmup_steps: int = 0
    """InfoNCE steps on the post-train windows before GRPO starts (negatives: the prior's sample and a
    foreign truth, ``perceptual_data.warm_up_perceptual``); 0: the perceptual model starts from its random
    initialisation (the paper's). Skipped when resuming from a checkpoint, which holds the perceptual model."""
    perceptual_warmup_batch_size: int = 16
    """Windows per warm-up step."""
    rollout_sampling_steps: int | None = 10
    """K of the training rollouts (EgoAllo's quadratic grid resampled, see motion.sampling_timesteps); None:
    the evaluation chain's --task.num-sampling-steps (30). Fewer steps buy more updates per CPU-minute: 10
    keeps the main job within 15 minutes on 2 CPU cores."""
    sde_window: tuple[int, int] | None = None
    """Rollout steps [START, END) (0 = the noisiest) that sample stochastically; the others are deterministic
    (eta 0), so group differences come from the window only. None: every step (EgoAllo's sampler)."""
    noise_frequencies: int | None = None
    """Exploration noise only in the lowest N temporal DCT frequencies of each rollout step (the rest of
    the step deterministic, the density exact on that subspace: ``diffgrpo.exploration``). None: all T."""
    noise_modalities: tuple[Modality, ...] | None = None
    """Exploration noise only on these adjacent modalities, e.g. body_rotmats (betas and contacts are read
    by no reward). None: every modality."""
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
    """Data, body model and the sampler (--task.sampler-eta, --task.num-sampling-steps, ...): the one home
    of the sampler settings, shared by rollouts and evaluation (:meth:`rollout_chain`)."""
    grpo: GRPOConfig = field(default_factory=default_grpo)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)

    def __post_init__(self) -> None:
        if not self.use_perceptual_reward:
            unused = [flag for flag, changed in (
                ("--perceptual-omega", self.perceptual_omega != 1.0),
                ("--perceptual-steps", self.perceptual_steps != 1),
                ("--perceptual-negatives", self.perceptual_negatives != ("x0_last",)),
                ("--perceptual-on-own-head", self.perceptual_on_own_head),
                ("--perceptual-warmup-steps", self.perceptual_warmup_steps != 0),
                ("--perceptual-warmup-batch-size", self.perceptual_warmup_batch_size != 16),
                ("--perceptual.*", self.perceptual != PerceptualConfig())) if changed]
            if unused:
                raise ValueError(f"{', '.join(unused)} only apply with the perceptual reward; drop them or drop "
                                 "--no-use-perceptual-reward.")
        params = parse_reward_params(self.reward_params)  # unknown rewards or parameters fail here
        configured = set(parse_reward_specs(self.grpo.rewards))
        configured |= {"ego_perceptual"} if self.use_perceptual_reward else set()
        if set(params) - configured:
            raise ValueError(f"--reward-params sets {', '.join(sorted(set(params) - configured))}, which this run does "
                             f"not use (its rewards: {', '.join(sorted(configured))}); drop them or add the reward.")
        if "omega" in params.get("ego_perceptual", {}):
            raise ValueError("--reward-params ego_perceptual.omega repeats --perceptual-omega; pass --perceptual-omega "
                             "only.")
        if not math.isfinite(self.perceptual_omega):
            raise ValueError(f"perceptual_omega={self.perceptual_omega} must be finite")
        if self.perceptual_steps < 1:
            raise ValueError(f"perceptual_steps={self.perceptual_steps} must be >= 1 (use --no-use-perceptual-reward "
                             "to train without the perceptual reward)")
        unknown = [k for k in self.perceptual_negatives if k not in NEGATIVE_KINDS]
        negatives = self.perceptual_negatives
        if unknown or not negatives or len(set(negatives)) != len(negatives):
            raise ValueError(f"--perceptual-negatives {list(negatives)}: give one or more distinct kinds from "
                             f"{NEGATIVE_KINDS}.")
        if "foreign" in self.perceptual_negatives and self.grpo.conditions_per_iteration < 2:
            raise ValueError("--perceptual-negatives foreign takes another condition's truth: it needs "
                             "--grpo.conditions-per-iteration >= 2 per process.")
        if self.perceptual_warmup_steps < 0 or self.perceptual_warmup_batch_size < 2:
            raise ValueError(f"--perceptual-warmup-steps {self.perceptual_warmup_steps} must be >= 0 and "
                             f"--perceptual-warmup-batch-size {self.perceptual_warmup_batch_size} >= 2.")
        if self.task.post_train_heads_only:  # before any data loading: these would fail at the first batch
            if self.grpo.train_split != "post_train":
                raise ValueError(f"--task.post-train-heads-only only changes the post_train split, but GRPO trains on "
                                 f"--grpo.train-split {self.grpo.train_split}; use post_train or drop the flag.")
            reads_body = [r for r in parse_reward_specs(self.grpo.rewards) if r in GROUND_TRUTH_REWARDS]
            reads_body += ["the perceptual model (its positives are bodies)"] * self.use_perceptual_reward
            reads_body += (["--grpo.probe.splits post_train (the probe's metrics compare with the body)"]
                           if self.grpo.probe.eval_every and "post_train" in self.grpo.probe.splits else [])
            if reads_body:
                raise ValueError(f"--task.post-train-heads-only serves post_train without bodies, but "
                                 f"{', '.join(reads_body)} need them; post-train with rewards that read no ground "
                                 "truth (physics_*, e.g. recipes/rlpf_ego_motion.py), probe other splits, or drop "
                                 "the flag.")
        if "test" in (self.grpo.probe.splits if self.grpo.probe.eval_every else ()):
            raise ValueError("--grpo.probe.splits holds test: the test windows are read once, after training, so "
                             "that nothing is chosen on them; probe post_train and validation instead.")
        if self.eval_max_windows is not None and self.eval_max_windows < 1:
            raise ValueError(f"eval_max_windows={self.eval_max_windows} must be >= 1 or unset (all windows)")
        self.rollout_chain()  # built and checked once (memoised): K, SDE window, exploration subspace
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = torch's default)")
        if Path(self.prior).is_dir():
            find_checkpoint_files(self.prior)  # raises naming the missing file before any data or model work
        elif not Path(self.prior).is_file():
            raise FileNotFoundError(f"prior {self.prior} does not exist; pass --prior PATH to a denoiser written by "
                                    "recipes/pretrain_ego_motion.py or to EgoAllo's checkpoint folder (default: the "
                                    "shipped demo prior)")

    def rollout_chain(self) -> SamplingChain:
        """The chain the GRPO rollouts sample and re-score: the task's sampler with K =
        ``rollout_sampling_steps``, the SDE window and the exploration subspace (``diffgrpo.chain``)."""
        features = (None if self.noise_modalities is None
                    else feature_range(self.noise_modalities, self.task.include_hands))
        return self.task.sampling_chain(self.rollout_sampling_steps, sde_window=self.sde_window,
                                        noise_frequencies=self.noise_frequencies, noise_features=features)

    def fingerprint(self) -> dict:
        """The job's settings a resumed run must keep, besides the GRPO config and the chain the core records
        (``train_grpo(fingerprint=...)``): everything that feeds the rewards, the rollout chain or the data
        (``--perceptual-omega``, ``--rollout-sampling-steps``, ``--no-use-perceptual-reward``, ``--reward-params``,
        ``--task.*``, the prior...).
        Left out: where the run writes and how it runs (``RUN_CONTROL``), the held-out evaluation's settings,
        and ``--task.cache-dir`` (where decoded windows are cached, not what they are)."""
        values = dataclasses.asdict(self)
        for key in (*RUN_CONTROL, "grpo"):
            values.pop(key)
        values["task"].pop("cache_dir")
        return json.loads(json.dumps(values, default=str))

    def effective(self) -> dict:
        """This config as JSON-able data, with the rollout chain's sampler as ``grpo.sampler`` (results.json)."""
        values = dataclasses.asdict(self)
        values["grpo"]["sampler"] = dataclasses.asdict(self.rollout_chain().sampler)
        return json.loads(json.dumps(values, default=str))


RUN_CONTROL = ("output_dir", "resume", "threads", "eval_seed", "eval_max_windows", "use_tto")
"""Config fields a resumed run may change: where it writes, how it runs, and the held-out evaluation after it."""


def perceptual_hooks(task: EgoMotionTask, perceptual: PerceptualTrainer | None, cfg: Config) -> LoopHooks:
    """Alg. 1 l.10 (``rewards.perceptual_update.PerceptualUpdate``): after each policy update, train the
    perceptual model on this iteration's negatives (``--perceptual-negatives``); no hooks without it."""
    if perceptual is None:
        return LoopHooks()
    settings = {"perceptual_negatives": list(cfg.perceptual_negatives),
                "perceptual_on_own_head": cfg.perceptual_on_own_head,
                "perceptual_warmup_steps": cfg.perceptual_warmup_steps,
                "perceptual_warmup_batch_size": cfg.perceptual_warmup_batch_size,
                "perceptual_steps": cfg.perceptual_steps}
    return PerceptualUpdate(task, perceptual, cfg.grpo.group_size, cfg.perceptual_negatives,
                            cfg.perceptual_on_own_head, cfg.perceptual_steps, settings).hooks()


def warm_up(task: EgoMotionTask, model: torch.nn.Module, perceptual: PerceptualTrainer, cfg: Config,
            split: str) -> dict[str, float]:
    """``--perceptual-warmup-steps`` InfoNCE steps on every ``split`` window (prior samples and foreign truths as
    negatives) before GRPO; returns the mean statistics of the last 10 steps. The prior samples on the
    rollout chain's K with the task's plain sampler (no SDE window or exploration subspace)."""
    windows = task.load_examples(split, torch.arange(task.num_examples(split)))
    negatives = prior_joints(task, model, windows, cfg.grpo.seed, "critic_warmup",
                             chain=task.sampling_chain(cfg.rollout_sampling_steps))
    history = warm_up_perceptual(perceptual, windows["joints_world"], windows["T_world_cpf"], negatives,
                             steps=cfg.perceptual_warmup_steps, batch_size=cfg.perceptual_warmup_batch_size,
                             generator=make_generator(cfg.grpo.seed, "critic_warmup"))
    return {k: sum(h[k] for h in history[-10:]) / len(history[-10:]) for k in history[-1]}


def evaluate_all(task: EgoMotionTask, model: torch.nn.Module, cfg: Config) -> dict[str, dict[str, float]]:
    """Mean of every metric on the held-out test windows on the evaluation chain, as {"": base, "+tto": after
    test-time optimisation} (``sampling.sampler.evaluate_windows``)."""
    result = evaluate_windows(task, model, "test", seed=cfg.eval_seed, use_tto=cfg.use_tto,
                              max_windows=cfg.eval_max_windows, chain=task.sampling_chain())
    names = {"base": "", "tto": "+tto"}
    return {names[v]: {k: float(x.mean()) for k, x in m.items()} for v, m in result.metrics.items()}


def main(cfg: Config) -> dict:
    """Run the job: evaluate the prior, post-train it (``train_grpo``), evaluate again, write the results."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.output_dir, mixed_precision=cfg.grpo.mixed_precision)
    accelerator.init_trackers("ego_motion", config={"seed": cfg.grpo.seed})
    task = EgoMotionTask(cfg.task)
    chain = cfg.rollout_chain()  # rollouts: K = --rollout-sampling-steps, SDE window, exploration subspace
    evaluation_chain = task.sampling_chain()  # evaluation and probe: EgoAllo's sampler, K = --task.num-sampling-steps
    grpo = cfg.grpo
    check_run(task, grpo, chain)  # before any data loading or evaluation
    model = load_denoiser(cfg.prior, device=accelerator.device)
    if model.config.include_hands != cfg.task.include_hands:
        raise ValueError(f"the prior {cfg.prior} has include_hands={model.config.include_hands} but the task "
                         f"{cfg.task.include_hands}; pass --task.include-hands {model.config.include_hands}.")
    perceptual = (PerceptualTrainer(cfg.perceptual, device=accelerator.device, accelerator=accelerator)
                  if cfg.use_perceptual_reward else None)
    params = parse_reward_params(cfg.reward_params)
    joint_rewards = [RewardSpec(name, weight, params.get(name, {}))
                     for name, weight in parse_reward_specs(grpo.rewards).items()]
    visual = ([RewardSpec("ego_perceptual", 1.0, {**params.get("ego_perceptual", {}), "scorer": perceptual,
                                              "omega": cfg.perceptual_omega})] if perceptual else [])
    rewards = RewardSet.from_specs(joint_rewards + visual)

    start_time = time.perf_counter()
    warmup = {}
    resuming = cfg.resume and latest_checkpoint(cfg.output_dir)
    if perceptual is not None and cfg.perceptual_warmup_steps and not resuming:
        warmup = warm_up(task, model, perceptual, cfg, grpo.train_split)  # a resume loads the perceptual model instead
        logger.info("perceptual-model warm-up, last 10 steps: %s", warmup)
    history = train_grpo(task, model, grpo, accelerator=accelerator, output_dir=cfg.output_dir,  # Alg. 1
                         resume=cfg.resume, rewards=rewards, hooks=perceptual_hooks(task, perceptual, cfg),
                         chain=chain, probe_chain=evaluation_chain, fingerprint=cfg.fingerprint(),
                         probe_rewards=RewardSet.from_specs(joint_rewards))  # the learned one moves: probe the fixed
    train_seconds = time.perf_counter() - start_time
    accelerator.end_training()
    if not accelerator.is_main_process:
        return {}

    # The test windows, read once: the last weights, the selected ones and the prior (weights equal to ones
    # already scored, e.g. a selection at the last iteration or at 0, reuse that score: evaluation is seeded)
    scored: list[tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]] = []

    def evaluate_once(policy: torch.nn.Module) -> dict[str, dict[str, float]]:
        state = policy.state_dict()
        for seen, result in scored:
            if seen.keys() == state.keys() and all(torch.equal(seen[k], v) for k, v in state.items()):
                return result
        result = evaluate_all(task, policy, cfg)
        scored.append(({k: v.detach().clone() for k, v in state.items()}, result))
        return result

    post = evaluate_once(model)  # the raw weights (an EMA is swapped in only for the probe): export those
    prior = export_prior(model, cfg.output_dir, cfg.prior, grpo.num_iterations)
    evaluated = {"grpo": post}
    results = {"prior": str(prior), "train_seconds": train_seconds,
               "seconds_per_iteration": _mean(history.get("time/iteration_seconds", [])),
               "num_processes": accelerator.num_processes, "critic_warmup": warmup, "config": cfg.effective()}
    if grpo.selection.metric:
        selected = load_selected(model, cfg.output_dir)
        evaluated["grpo_selected"] = evaluate_once(model)
        results["selected"] = {**dataclasses.asdict(selected), "prior": str(
            export_prior(model, cfg.output_dir / "best", cfg.prior, selected.iteration))}
    evaluated["base"] = evaluate_once(load_denoiser(cfg.prior, device=accelerator.device))
    for name in ("base", "grpo", "grpo_selected"):
        if name in evaluated:
            results[name] = evaluated[name][""]
            if cfg.use_tto:
                results[f"{name}+tto"] = evaluated[name]["+tto"]
    write_results(cfg.output_dir, results, history)
    return results


def post_trained_policy(run_dir: Path, prior: Path) -> torch.nn.Module:
    """The policy of a run directory's newest checkpoint, in ``prior``'s architecture (``network.load_denoiser``).

    Raises:
        FileNotFoundError: ``run_dir`` holds no checkpoint.
    """
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}; train a run there first, or give a run directory "
                                "that holds one.")
    model = load_denoiser(prior)
    load_checkpoint(make_accelerator(run_dir, log_with=None), path, model=model)
    return model


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_results(output_dir: Path, results: dict, history: dict[str, list[float]]) -> None:
    """results.json, history.json, results.md (the metric table, also printed) and curves.png in ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "history.json").write_text(json.dumps(history))
    variants = [v for v in ("base", "grpo", "grpo_selected", "base+tto", "grpo+tto", "grpo_selected+tto")
                if v in results]
    lines = ["| metric (held-out CMU windows) | " + " | ".join(variants) + " |",
             "|---|" + "---:|" * len(variants)]
    for name, unit in METRIC_UNITS.items():
        lines.append(f"| {name} ({unit}) | " + " | ".join(f"{results[v][name]:.3f}" for v in variants) + " |")
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    plot_history(history, output_dir / "curves.png", title="MotionGRPO")
    print("\n".join(lines))

