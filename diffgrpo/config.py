"""Typed, frozen configs for the GRPO core; recipes nest them and ``tyro`` turns them into flags.

Why frozen dataclasses: a config is checked once, in ``__post_init__``, before any model work,
and cannot drift afterwards; ``tyro.cli`` shows each field's docstring as its ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from diffgrpo.advantages import AdvantageConfig
from diffgrpo.exploration import ExplorationSubspace
from diffgrpo.loss import LossConfig
from diffgrpo.perturb import PerturbConfig  # its home is the perturbers' module; imported for GRPOConfig.perturb
from diffgrpo.sde import Method


@dataclass(frozen=True)
class SamplerConfig:
    """How one reverse step becomes a Gaussian policy (see ``diffgrpo.sde``)."""

    method: Method | None = None
    """Step rule: ddim, ddpm, egoallo (DDPM family) or flow_sde, cps (flow matching); None = the
    scheduler's default (DDIM -> ddim, DDPM -> ddpm, FlowMatchEuler -> flow_sde). Whether the method
    fits the task's scheduler, and eta its schedule, is checked at start-up by
    ``diffgrpo.rollout.check_sampler``."""
    eta: float = 1.0
    """Noise scale of the stochastic step (DDIM eta; EgoAllo uses 0.8; flow SDE 'a')."""
    log_prob_reduction: Literal["sum", "mean"] = "mean"
    """'mean' averages the per-dimension log-density: ratios then have a scale independent of the
    sample size, so clip ranges and learning rates carry over between tasks; 'sum' is the exact
    joint density."""
    egoallo_denominator_offset: float = 0.1
    """The '+0.1' of EgoAllo's released sampler (method 'egoallo' only); 0 gives the plain form."""
    sde_window: tuple[int, int] | None = None
    """[start, end) step indices in sampling order (0 = the noisiest) that sample stochastically with
    ``eta``; the other steps take the same rule with eta = 0 (deterministic: no density, not trained),
    so every difference within a group comes from the window's steps. None: every step is stochastic."""
    noise_frequencies: int | None = None
    """Exploration noise only in the lowest N DCT-II frequencies along the sample's axis 1 (time, for
    trajectories); the rest of each step is deterministic (``diffgrpo.exploration``). None: all of them."""
    noise_features: tuple[int, int] | None = None
    """Exploration noise only on features [START, STOP) of the sample's last axis (e.g. the ego-motion body
    rotations, 16 205: not betas or contacts, which no reward reads). None: every feature."""

    guidance_scale: float = 1.0
    """Classifier-free guidance weight w: the policy's prediction is uncond + w (cond - uncond), both when
    sampling and when re-scoring (``diffgrpo.guidance``); 1 = no guidance (one network pass). w > 1 needs a
    task whose condition carries ``negative_*`` (unconditional) entries, e.g. the text-to-image task."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 1.0):
            raise ValueError(f"sampler.guidance_scale={self.guidance_scale} must be >= 1 (1 = no guidance); fix "
                             "--sampler.guidance-scale")
        methods = ("ddim", "ddpm", "egoallo", "flow_sde", "cps")
        if self.method is not None and self.method not in methods:
            raise ValueError(f"sampler.method={self.method!r} is not one of {methods} (or None for the scheduler's "
                             "default); fix --sampler.method")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")
        if self.method in ("ddim", "cps") and self.eta > 1:
            raise ValueError(f"sampler.eta={self.eta} > 1 is undefined for method {self.method!r}; use 0 <= eta <= 1")
        if self.method != "egoallo" and self.egoallo_denominator_offset != 0.1:
            raise ValueError("sampler.egoallo_denominator_offset only applies to method 'egoallo'; drop it or pass "
                             "--sampler.method egoallo")
        if not math.isfinite(self.egoallo_denominator_offset) or self.egoallo_denominator_offset < 0:
            raise ValueError(f"sampler.egoallo_denominator_offset={self.egoallo_denominator_offset} must be >= 0 "
                             "(EgoAllo uses 0.1)")
        if self.log_prob_reduction not in ("sum", "mean"):
            raise ValueError(f"sampler.log_prob_reduction must be 'sum' or 'mean', got {self.log_prob_reduction!r}")
        window = self.sde_window
        if window is not None and (len(window) != 2 or not 0 <= window[0] < window[1]):
            raise ValueError(f"sampler.sde_window must be START END with 0 <= START < END (step indices, 0 = the "
                             f"noisiest), got {self.sde_window}")

        if self.noise_frequencies is not None and self.noise_frequencies < 1:
            raise ValueError(f"sampler.noise_frequencies={self.noise_frequencies} must be >= 1 (or None for all)")
        features = self.noise_features
        if features is not None and (len(features) != 2 or not 0 <= features[0] < features[1]):
            raise ValueError(f"sampler.noise_features must be START STOP with 0 <= START < STOP, got {features}")

    def exploration_subspace(self, sample_shape: tuple[int, ...]) -> ExplorationSubspace | None:
        """Where the stochastic steps put their noise, for samples shaped ``sample_shape`` (None: everywhere).

        Raises ValueError when ``noise_frequencies`` exceeds the axis length or ``noise_features`` the last
        axis (checked at start-up by ``diffgrpo.rollout.check_sampler``).
        """
        return ExplorationSubspace.build(tuple(sample_shape), self.noise_frequencies, self.noise_features)

    def eta_at(self, step: int) -> float:
        """The eta of sampling step ``step`` (0 = the noisiest): ``eta`` inside ``sde_window``, else 0."""
        if self.sde_window is None or self.sde_window[0] <= step < self.sde_window[1]:
            return self.eta
        return 0.0


@dataclass(frozen=True)
class StepSelectionConfig:
    """Which stochastic steps of each chain enter the loss."""

    mode: Literal["all", "random_fraction", "window"] = "all"
    fraction: float = 1.0
    """For random_fraction: share of the stochastic steps drawn (fresh each iteration)."""
    window: tuple[int, int] | None = None
    """For window (and only there): [start, end) step indices in sampling order (0 = the noisiest
    step), 0 <= start < end <= K; end is checked against the task's K at start-up."""

    def __post_init__(self) -> None:
        if self.mode not in ("all", "random_fraction", "window"):
            raise ValueError(f"steps.mode={self.mode!r} is not one of 'all', 'random_fraction', 'window'")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"steps.fraction must be in (0, 1], got {self.fraction}")
        if self.mode != "random_fraction" and self.fraction != 1.0:
            raise ValueError(f"steps.fraction={self.fraction} is only used with --grpo.steps.mode random_fraction; "
                             "set that mode or drop the flag")
        if self.mode == "window":
            if self.window is None or len(self.window) != 2 or not 0 <= self.window[0] < self.window[1]:
                raise ValueError(f"steps.mode='window' needs --grpo.steps.window START END with 0 <= START < END, "
                                 f"got {self.window}")
        elif self.window is not None:
            raise ValueError(f"steps.window={self.window} is only used with --grpo.steps.mode window; set that mode "
                             "or drop the flag")


@dataclass(frozen=True)
class ProbeConfig:
    """Which conditions and how many noises the probe evaluates, and how often."""

    splits: tuple[str, ...] = ("train", "test")
    """Splits to probe (each gets its own conditions), e.g. the post-training split and the test split."""
    conditions_per_split: int = 16
    """C: conditions per split (fewer if the split is smaller), a seeded choice fixed for the run."""
    noises_per_condition: int = 4
    """M: fixed noises per condition."""
    seed: int = 4321
    """Seeds the choice of conditions and the noises (the same for every checkpoint)."""
    eval_every: int = 0
    """Evaluate before training, every this many iterations and after the last (0: never)."""

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("probe.splits is empty; name at least one split or set --grpo.probe.eval-every 0")
        if self.conditions_per_split < 2:
            raise ValueError(f"probe.conditions_per_split={self.conditions_per_split} must be >= 2 (an interval "
                             "over conditions needs two)")
        if self.noises_per_condition < 1:
            raise ValueError(f"probe.noises_per_condition={self.noises_per_condition} must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"probe.eval_every={self.eval_every} must be >= 0 (0 = no probe evaluation)")
        if self.eval_every == 0 and (self.conditions_per_split, self.noises_per_condition, self.seed) != (16, 4, 4321):
            raise ValueError("--grpo.probe.* settings were given but probe.eval_every = 0 (no probe evaluation); "
                             "pass --grpo.probe.eval-every N or drop them")


@dataclass(frozen=True)
class SelectionConfig:
    """Which probe quantity picks the checkpoint a run reports beside its last one (``diffgrpo.checkpoint_selection``).

    Why: the last iteration is not the best one when a run drifts after a peak, and choosing by the test
    split's numbers would bias the test numbers reported; the probe of a validation split (data neither
    trained on nor tested) decides instead. The probe's value is the mean over its C x M samples."""

    metric: str | None = None
    """A probe key ``reward/<split>/<name>`` or ``metric/<split>/<name>`` (e.g. ``metric/validation/mpjpe_mm``);
    None: no selection. Its split must be among ``probe.splits``."""
    mode: Literal["min", "max"] = "min"
    """'min': lower is better (an error such as MPJPE); 'max': higher is better (a reward)."""

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"selection.mode={self.mode!r} is not one of 'min' (lower is better), 'max'")
        if self.metric is not None and (len(self.metric.split("/")) != 3
                                        or self.metric.split("/")[0] not in ("reward", "metric")):
            raise ValueError(f"selection.metric={self.metric!r} must read reward/<split>/<name> or "
                             "metric/<split>/<name>, e.g. --grpo.selection.metric metric/validation/mpjpe_mm")
        if self.metric is None and self.mode != "min":
            raise ValueError("--grpo.selection.mode was given without --grpo.selection.metric; add it or drop it")

    @property
    def split(self) -> str | None:
        """The probe split the metric is read on."""
        return None if self.metric is None else self.metric.split("/")[1]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, an optional decay of the learning rate, and gradient clipping."""

    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """After the warm-up: constant, or decaying to 0 at the run's last planned optimiser step (num_iterations x
    inner_epochs x num_minibatches), linearly or as a half cosine (Loshchilov and Hutter 2017, SGDR, without
    restarts). The schedule advances on the optimiser steps taken: a step skipped (non-finite, or no kept rows) or
    not taken (an iteration with fewer terms than minibatches) leaves it where it is, so such a run ends above 0.
    A decaying schedule is tied to the run's length: a resume may not change num_iterations."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    betas: tuple[float, float] = (0.9, 0.999)
    on_nonfinite: Literal["skip", "stop"] = "skip"
    """An optimiser step whose loss or gradient holds a NaN or an infinity (``diffgrpo.finite_update``): 'skip'
    drops it on every process (weights, optimiser moments and LR schedule untouched; counted in
    ``loss/nonfinite_steps``), 'stop' ends the run naming the parameters."""
    max_consecutive_nonfinite: int = 3
    """With 'skip', the run stops at this many skipped optimiser steps in a row: then the policy itself, not
    one unlucky batch, produces them."""

    def __post_init__(self) -> None:
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"optim.on_nonfinite={self.on_nonfinite!r} is not one of 'skip', 'stop'")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"optim.max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.lr_schedule={self.lr_schedule!r} is not one of 'constant', 'linear', 'cosine'")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"optim.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class EMAConfig:
    """An exponential moving average of the trained weights (``diffgrpo.ema``), kept beside the policy."""

    use_ema: bool = False
    """Keep the average (of the trainable parameters only: the LoRA adapters when training LoRA)."""
    decay: float = 0.9
    """theta_ema <- decay theta_ema + (1 - decay) theta after every iteration's update (one per iteration,
    so 0.9 averages over about the last 10 iterations)."""
    use_for_eval: bool = False
    """Evaluate the probe set (and a recipe's final evaluation) with the averaged weights swapped in."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.decay) and 0.0 <= self.decay < 1.0):
            raise ValueError(f"ema.decay={self.decay} must be in [0, 1); fix --grpo.ema.decay")
        if not self.use_ema and (self.use_for_eval or self.decay != 0.9):
            raise ValueError("--grpo.ema.decay / --grpo.ema.use-for-eval were given without --grpo.ema.use-ema; "
                             "add it or drop them")


@dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run: groups, advantages, loss, optimiser, bookkeeping.

    The sampler settings are not here: they belong to the sampling chain (``diffgrpo.chain``), which a
    recipe builds once from its task and its own ``SamplerConfig`` and hands to the loop."""

    seed: int = 0
    num_iterations: int = 20
    """Outer iterations: sample groups, score, update."""
    train_split: str = "train"
    """The task's split whose conditions GRPO post-trains on (ego-motion: 'post_train', clips the prior never saw)."""
    conditions_per_iteration: int = 4
    """B: conditions per process per iteration (each gets its own group)."""
    group_size: int = 8
    """G: samples per condition sharing one initial noise."""
    inner_epochs: int = 1
    """Passes over each rollout batch (the first is exactly on-policy)."""
    num_minibatches: int = 1
    """Optimiser steps per pass: the (micro-batch, trained step) terms are shuffled and split into this many
    minibatches. The first step is exactly on-policy, later ones off-policy (see ``loss.clip_range``)."""
    step_weighting: Literal["uniform", "unit_score"] = "uniform"
    """Per-step weight of the loss terms: 'uniform' (the paper: mean over steps) or 'unit_score' (weight
    proportional to the step's std, so the low-noise late steps do not dominate the gradient)."""
    micro_batch_size: int = 32
    """Chains per network call, in rollout and in the update alike (same batches -> ratio 1)."""
    rollout_chunks: int = 1
    """Split each iteration's B conditions into this many rollout chunks; the rewards of one chunk are
    computed in a worker thread while the next chunk samples (``RewardSet.submit``). B must be a multiple
    of it and each chunk's B / chunks x G chains a multiple of ``micro_batch_size`` (so the update re-scores
    the very network batches the rollout ran)."""
    steps: StepSelectionConfig = field(default_factory=StepSelectionConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    """Optional moving average of the trained weights, saved in checkpoints."""
    rewards: tuple[str, ...] = ()
    """Rewards as 'name' or 'name:weight' (e.g. shapes_iou:1.0); names from the reward registry."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """Fixed probe set evaluated every ``probe.eval_every`` iterations (``diffgrpo.probe``)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Keep the checkpoint whose probe value of ``selection.metric`` is best in ``<output_dir>/best/`` (the probe
    before training included, so the starting weights are selected when no iteration beats them)."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (0 = only at the end)."""
    diagnostics_every: int = 0
    """Every this many iterations (0: never), measure the update (``diffgrpo.diagnostics``): gradient
    agreement of two halves of the groups and the weights' relative change since the run began; for ratio and
    x0 regression per step bucket, with per-step gradient norms and the KL between the step distributions
    before and after the update; for nft and awm on the update's own forward-process loss, with noisings of
    its own. Costs about one extra forward and backward pass over the batch on those iterations."""
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    """accelerate's mixed precision. "auto": bf16 where it pays (CUDA with native bf16, a CPU with AMX-BF16),
    fp32 elsewhere (``diffgrpo.precision``; on a CPU with AVX512-BF16 alone bf16 measured slower than fp32,
    docs/benchmarks.md). Densities and the on-policy ratio are exact in every mode."""
    overwrite_output_dir: bool = False
    """Start over in an output directory that already holds checkpoints, deleting them; without it a run that
    does not resume refuses such a directory (``diffgrpo.run_state.start_run``). Ignored by a run that resumes."""

    @property
    def planned_optimizer_steps(self) -> int:
        """Optimiser steps the run plans: num_iterations x inner_epochs x num_minibatches (what a decaying
        learning rate spans, ``OptimConfig.lr_schedule``)."""
        return self.num_iterations * self.inner_epochs * self.num_minibatches

    def __post_init__(self) -> None:
        for name in ("num_iterations", "conditions_per_iteration", "group_size", "inner_epochs",
                     "micro_batch_size", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.rollout_chunks < 1 or self.conditions_per_iteration % self.rollout_chunks:
            raise ValueError(f"rollout_chunks={self.rollout_chunks} must be >= 1 and divide "
                             f"conditions_per_iteration={self.conditions_per_iteration}; fix --grpo.rollout-chunks")
        chunk_rows = self.conditions_per_iteration // self.rollout_chunks * self.group_size
        if self.rollout_chunks > 1 and chunk_rows % self.micro_batch_size:
            raise ValueError(f"each rollout chunk holds {chunk_rows} chains, not a multiple of micro_batch_size="
                             f"{self.micro_batch_size}, so the update would re-score other network batches than the "
                             "rollout ran (on-policy ratio != 1); pick --grpo.micro-batch-size dividing "
                             f"{chunk_rows} or change --grpo.rollout-chunks")
        heads = self.perturb.heads_per_group
        if self.perturb.sharing == "nested" and (self.group_size % heads or self.group_size // heads < 2):
            raise ValueError(f"perturb.sharing='nested' splits each group of {self.group_size} into "
                             f"{heads} sub-groups of equal size >= 2; pick --grpo.group-size a multiple of {heads} "
                             f"and >= {2 * heads}, or change --grpo.perturb.heads-per-group")
        if not self.rewards:
            raise ValueError("no rewards configured: pass --rewards NAME[:WEIGHT] ... "
                             "(see diffgrpo.rewards.available_rewards())")
        if self.diagnostics_every < 0:
            raise ValueError(f"diagnostics_every must be >= 0 (0 = never), got {self.diagnostics_every}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        planned = self.planned_optimizer_steps
        if self.optim.lr_schedule != "constant" and self.optim.warmup_steps >= planned:
            raise ValueError(f"optim.lr_schedule={self.optim.lr_schedule!r} decays after the warm-up, but "
                             f"optim.warmup_steps={self.optim.warmup_steps} covers all {planned} optimiser steps of "
                             "the run; lower --grpo.optim.warmup-steps or keep --grpo.optim.lr-schedule constant")
        if self.selection.metric is not None:
            if not self.probe.eval_every or self.selection.split not in self.probe.splits:
                raise ValueError(f"selection.metric={self.selection.metric!r} is read on the probe of split "
                                 f"{self.selection.split!r}, but the probe evaluates {list(self.probe.splits)} every "
                                 f"{self.probe.eval_every} iterations; pass --grpo.probe.eval-every N and a "
                                 "--grpo.probe.splits that holds it")
            if self.checkpoint_every and self.probe.eval_every % self.checkpoint_every:
                raise ValueError(f"selection keeps a probed checkpoint and must be able to resume from it: "
                                 f"probe.eval_every={self.probe.eval_every} must be a multiple of "
                                 f"checkpoint_every={self.checkpoint_every}; change --grpo.checkpoint-every")
        if self.mixed_precision not in ("no", "fp16", "bf16", "auto"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} is not one of 'no', 'fp16', 'bf16', 'auto'")
        if self.step_weighting not in ("uniform", "unit_score"):
            raise ValueError(f"step_weighting={self.step_weighting!r} is not one of 'uniform', 'unit_score'")
        if self.loss.objective in ("nft", "awm") and (self.steps != StepSelectionConfig()
                                                      or self.step_weighting != "uniform"):
            raise ValueError(f"--grpo.steps.* and --grpo.step-weighting select and weight the rollout's steps, but "
                             f"objective={self.loss.objective!r} trains on forward noisings of the final samples "
                             "(--grpo.loss.forward-timesteps, --grpo.loss.timesteps-per-sample); drop them")
