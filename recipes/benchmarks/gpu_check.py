"""One prepared GPU check: the library at the scales users post-train at, in one command of minutes.

Every other figure in docs/benchmarks.md comes from two CPU cores. This script measures what only a
GPU can show, within a time budget (default: 8 minutes on one H100-class GPU), on random weights
built from configs (nothing is downloaded). Sections, in order:

- ``ego_sampling``: EgoAllo's denoiser at the released checkpoint's config (``EgoAlloDenoiser``,
  50,447,088 numbers, hands included, 128-frame windows) sampling K = 30 steps for 64 windows,
  float32 and under bf16 autocast;
- ``ego_grpo_fp32``, ``ego_grpo_bf16``: one GRPO iteration (rollouts, joint-level rewards,
  advantages, one optimiser step on the whole network) at the scale of MotionGRPO's first author's
  code, 64 head trajectories x groups of 16 = 1,024 rollouts in micro-batches of 128 (out of memory
  while sampling halves the conditions, in the update the micro-batch: the largest that fits is
  measured and the attempts recorded); seconds of sampling and of the update, peak memory, and the
  on-policy importance ratio's largest deviation from 1, which must be exactly 0 (the first update
  after sampling reproduces the rollout's log-probabilities bit for bit);
- ``t2i_unet``, ``t2i_sd3``: one GRPO iteration with LoRA and classifier-free guidance at 512 px on
  Stable Diffusion 1.5- and SD3 Medium-size pipelines (``tasks.text_to_image.full_size``);
- ``t2i_forward_process``: one iteration of a forward-process objective on the SD3-size pipeline,
  through :data:`FORWARD_PROCESS_ITERATION` (recorded as skipped while that is None).

    python recipes/benchmarks/gpu_check.py --output docs/data/gpu_check.json --write-docs docs/benchmarks.md
    python recipes/benchmarks/gpu_check.py --from-results docs/data/gpu_check.json --write-docs docs/benchmarks.md
    python recipes/benchmarks/gpu_check.py --dry-run     # tiny sizes on the CPU, seconds (run by the tests)

Budget: before each section, the elapsed time plus the section's reserve (:data:`RESERVE_S`, a rough
upper bound of its cost on an H100) is compared with ``--budget-s`` minus ``--margin-s``; a section that
would not fit is recorded as "skipped: budget" and the next ones still get their chance. The GRPO
sections also skip their update when their collect phase has used up the budget. Results are written after
every section, so a run stopped by an outer timeout keeps what it finished. A section that raises is
recorded as failed (with the error) and the others still run. Each timed iteration follows a warm-up
iteration of one micro-batch (kernel selection, allocator); peak memory (``torch.cuda.max_memory_allocated``)
includes the weights and optimiser state.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from diffgrpo.config import GRPOConfig, OptimConfig, PerturbConfig, SamplerConfig
from diffgrpo.launch import make_accelerator
from diffgrpo.lora import LoRAConfig, add_lora
from diffgrpo.rewards import RewardSet
from diffgrpo.rollout import RandomStreams, group_ids_for, rollout
from diffgrpo.task import batch_to, x0_pred_steps_of
from diffgrpo.train_step import collect, make_perturber, model_fn_for, policy_update
from diffgrpo.trainer import make_optimizer, parse_reward_specs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check_report as report  # noqa: E402  (the environment record, command lines and docs table)

# ---------------------------------------------------------------------------------------------
# The library's sampling and GRPO API, called only from these functions (adapt them here when
# the core's signatures change).


def sample_chains(task, model, scheduler, sampler: SamplerConfig, cond, num_chains: int, *,
                  micro_batch_size: int, streams: RandomStreams):
    """``num_chains`` independent sampling chains (one group each) of ``task`` under ``cond`` (num_chains rows)."""
    group_ids = group_ids_for(num_chains, 1, device=streams.initial_noise.device)
    return rollout(model_fn_for(task, model, sampler.guidance_scale), scheduler, cond, group_ids,
                   task.sampling_timesteps(), task.sample_shape, generator=streams.initial_noise, sampler=sampler,
                   micro_batch_size=micro_batch_size, step_generator=streams.step_noise,
                   x0_pred_steps=x0_pred_steps_of(task))


def grpo_collect(task, policy, scheduler, batch, grpo: GRPOConfig, rewards: RewardSet, streams: RandomStreams,
                 accelerator):
    """Alg. 1 lines 2-6 for one batch of conditions: perturb, sample the groups, score, normalise."""
    return collect(task, policy, scheduler, batch, cfg=grpo, rewards=rewards, perturber=make_perturber(grpo),
                   generator=streams, group_id_offset=0, autocast=accelerator.autocast)


def grpo_update(task, model, scheduler, data, optimizer, grpo: GRPOConfig, streams: RandomStreams,
                accelerator) -> float:
    """Alg. 1 lines 7-9 (one optimiser step); returns the first update's largest |ratio - 1| (exactly on-policy)."""
    stats = policy_update(task, model, scheduler, data, optimizer, cfg=grpo, generator=streams.step_selection,
                          accelerator=accelerator, order_generator=streams.minibatch_order)
    return stats["loss/on_policy_ratio_max_dev"]


FORWARD_PROCESS_ITERATION: Callable[..., dict] | None = None
"""One iteration of a forward-process objective (rollouts keep only x0 and rewards; the update noises
them afresh), called as ``fn(task, model, scheduler, batch, grpo, rewards, streams, optimizer, accelerator)``
like :func:`grpo_collect` then :func:`grpo_update` (``model`` as ``accelerator.prepare`` returned it), returning
scalars to record. None: the library has no such objective yet and section ``t2i_forward_process`` is
recorded as skipped."""

# ---------------------------------------------------------------------------------------------
# Configuration

SECTIONS = ("ego_sampling", "ego_grpo_fp32", "ego_grpo_bf16", "t2i_unet", "t2i_sd3", "t2i_forward_process")
RESERVE_S = {"ego_sampling": 20.0, "ego_grpo_fp32": 90.0, "ego_grpo_bf16": 60.0, "t2i_unet": 60.0,
             "t2i_sd3": 150.0, "t2i_forward_process": 120.0}
"""Seconds a section is given at most on an H100 (a guess until the first run; the budget check uses it)."""
EGO_REWARDS = ("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel")
"""MotionGRPO's joint-level rewards (read the ground-truth body of each window)."""
PROMPTS = ("a cat", "a dog", "a horse", "a monkey", "a rabbit", "a zebra", "a spider", "a bird")


@dataclass(frozen=True)
class Config:
    """The GPU check's sizes, budget and outputs (``--dry-run`` replaces every size by a tiny one)."""

    dry_run: bool = False
    """Tiny sizes, the same code paths end to end, in seconds (on the CPU: what the test suite runs)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """auto: the CPU for --dry-run, else CUDA. (--dry-run --device cuda checks the code paths on a GPU in
    seconds; --device cpu at full size is for small --*-conditions only.)"""
    sections: tuple[str, ...] = SECTIONS
    """Sections to run, in this order."""
    output: Path | None = None
    """Write the results JSON here (after every section)."""
    write_docs: Path | None = None
    """Insert (or replace) the generated markdown section in this file, e.g. docs/benchmarks.md."""
    from_results: Path | None = None
    """Run nothing: read this results JSON and write its table (with --write-docs) or print it."""
    budget_s: float = 480.0
    """Seconds the whole command may take (8 minutes): a section starts only while the elapsed time plus its
    reserve stays within budget_s - margin_s."""
    margin_s: float = 60.0
    """Seconds of the budget kept free for what the sections' clock does not see: interpreter start-up and
    imports before the first section (about 15 s), and an overrun of the last section's reserve."""
    seed: int = 0
    git_revision: str = ""
    """The commit to record, for a copy of the tree without git metadata; empty: ask git."""
    ego_windows: int = 64
    """Windows sampled in ego_sampling."""
    ego_conditions: int = 64
    """B: head trajectories per GRPO iteration (halved while sampling runs out of memory)."""
    ego_group_size: int = 16
    """G: rollouts per head trajectory."""
    ego_micro_batch_size: int = 128
    """Chains per network call, in the rollout and in the update alike (halved while the update runs out of
    memory)."""
    ego_sampling_steps: int = 30
    """K: EgoAllo's sampler steps."""
    ego_window_frames: int = 128
    """T: frames per window (EgoAllo's training windows)."""
    t2i_image_size_px: int = 512
    t2i_conditions: int = 8
    """Prompts per GRPO iteration (halved while sampling runs out of memory)."""
    t2i_group_size: int = 8
    t2i_micro_batch_size: int = 8
    """Images per network call, twice as many rows with guidance (halved while the update runs out of memory)."""
    t2i_steps: int = 10
    """K: sampling steps of the chain."""
    t2i_guidance_scale: float = 4.5
    t2i_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """dtype of the pipelines' weights (LoRA adapters train in float32); bf16 runs under bf16 autocast."""
    lora_rank: int = 8

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(f"--sections {' '.join(self.sections)}: unknown {unknown}; choose from "
                             f"{' '.join(SECTIONS)}")
        if self.budget_s <= self.margin_s or self.margin_s < 0:
            raise ValueError(f"--budget-s {self.budget_s} must exceed --margin-s {self.margin_s} >= 0")
        if self.from_results is not None and self.output is not None:
            raise ValueError("--from-results runs nothing, so --output has nothing new to write; drop one")
        for name in ("ego_windows", "ego_conditions", "ego_group_size", "ego_micro_batch_size", "ego_sampling_steps",
                     "t2i_conditions", "t2i_group_size", "t2i_micro_batch_size", "t2i_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        if min(self.ego_group_size, self.t2i_group_size) < 2:
            raise ValueError("--ego-group-size and --t2i-group-size must be >= 2 (group-relative advantages)")

    def effective(self) -> Config:
        """The sizes actually run: ``--dry-run``'s tiny ones, else these. (K = 6 is the shortest EgoAllo chain on
        which its eta = 0.8 step is defined.)"""
        if not self.dry_run:
            return self
        return dataclasses.replace(self, ego_windows=2, ego_conditions=2, ego_group_size=2, ego_micro_batch_size=2,
                                   ego_sampling_steps=6, ego_window_frames=32, t2i_image_size_px=32,
                                   t2i_conditions=1, t2i_group_size=2, t2i_micro_batch_size=2, t2i_steps=2,
                                   lora_rank=2)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Env:
    """Where and until when the sections run."""

    device: torch.device
    deadline: float
    """``time.perf_counter()`` value after which no new work starts (budget minus margin)."""
    workdir: Path
    """Scratch folder (the accelerators' project folders)."""

    def past_deadline(self) -> bool:
        return time.perf_counter() > self.deadline


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float | None]:
    """(fn(), seconds, peak allocated GiB during it or None on the CPU); CUDA is synchronised around it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return result, seconds, (torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row(what: str, precision: str, seconds: float, peak_gib: float | None, ratio_max_dev: float | None = None,
        detail: str = "") -> dict:
    """One line of the table."""
    return {"what": what, "precision": precision, "seconds": seconds, "peak_memory_gib": peak_gib,
            "on_policy_ratio_max_dev": ratio_max_dev, "detail": detail}


class UpdateOutOfMemory(RuntimeError):
    """The update (not the sampling) ran out of memory: its activations, bounded by the micro-batch, are too big."""


@dataclass(frozen=True)
class Iteration:
    """What a measured iteration runs on."""

    task: object
    policy: torch.nn.Module
    """The module itself (what rollouts call)."""
    model: torch.nn.Module
    """The module as ``accelerator.prepare`` returned it (what the update calls)."""
    scheduler: object
    optimizer: torch.optim.Optimizer
    accelerator: object
    rewards: RewardSet


def grpo_step(it: Iteration, batch, grpo: GRPOConfig, streams: RandomStreams, env: Env) -> dict:
    """Collect (sampling, decoding, rewards, advantages) then update, each timed; the update is skipped (and
    said so) once the budget is spent."""
    data, collect_s, collect_peak = timed(
        lambda: grpo_collect(it.task, it.policy, it.scheduler, batch, grpo, it.rewards, streams, it.accelerator),
        env.device)
    out = {"collect_s": collect_s, "peak_memory_gib": collect_peak,
           "samples_finite": bool(torch.isfinite(data.trajectory.samples).all())}
    if env.past_deadline():
        return {**out, "update": "skipped: budget"}
    try:
        ratio_dev, update_s, update_peak = timed(
            lambda: grpo_update(it.task, it.model, it.scheduler, data, it.optimizer, grpo, streams, it.accelerator),
            env.device)
    except torch.cuda.OutOfMemoryError as error:
        raise UpdateOutOfMemory(str(error)) from None
    return {**out, "update_s": update_s, "iteration_s": collect_s + update_s, "on_policy_ratio_max_dev": ratio_dev,
            "peak_memory_gib": None if update_peak is None else max(update_peak, collect_peak)}


def forward_process_step(it: Iteration, batch, grpo: GRPOConfig, streams: RandomStreams, env: Env) -> dict:
    """One timed call of :data:`FORWARD_PROCESS_ITERATION`."""
    stats, seconds, peak = timed(lambda: FORWARD_PROCESS_ITERATION(
        it.task, it.model, it.scheduler, batch, grpo, it.rewards, streams, it.optimizer, it.accelerator), env.device)
    return {**{k: float(v) for k, v in stats.items()}, "iteration_s": seconds, "peak_memory_gib": peak}


def measure_iteration(task, model: torch.nn.Module, grpo: GRPOConfig, env: Env, step=grpo_step) -> dict:
    """A warm-up iteration of one micro-batch, then ``step`` at B = ``grpo.conditions_per_iteration``.

    Out of memory in the update halves the micro-batch (it bounds the activations); out of memory
    elsewhere halves B (the stored chains); each attempt is recorded. Raises when nothing fits in time.
    """
    accelerator = fresh_accelerator(env, grpo.mixed_precision)
    optimizer, _ = make_optimizer(model, grpo)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    it = Iteration(task, accelerator.unwrap_model(prepared), prepared, task.make_scheduler(), optimizer, accelerator,
                   RewardSet.from_specs(parse_reward_specs(grpo.rewards)))

    def once(conditions: int, micro_batch_size: int) -> dict:
        sized = dataclasses.replace(grpo, conditions_per_iteration=conditions, micro_batch_size=micro_batch_size)
        batch = load_batch(task, grpo.train_split, conditions, env.device)
        streams = RandomStreams.from_seed(grpo.seed, device=env.device)
        before = torch.cuda.memory_allocated(env.device) / 2**30 if env.device.type == "cuda" else None
        return {"conditions": conditions, "group_size": grpo.group_size, "rollouts": conditions * grpo.group_size,
                "micro_batch_size": micro_batch_size, "memory_before_gib": before,
                **step(it, batch, sized, streams, env)}

    micro, conditions = grpo.micro_batch_size, grpo.conditions_per_iteration
    warm_up = once(min(conditions, max(1, micro // grpo.group_size)), micro)
    attempts = []
    while True:
        try:
            return {**once(conditions, micro), "warm_up": warm_up, "out_of_memory_attempts": attempts}
        except UpdateOutOfMemory:
            attempts.append(f"update at {conditions} x {grpo.group_size}, micro-batch {micro}")
            micro //= 2
        except torch.cuda.OutOfMemoryError:
            attempts.append(f"{conditions} x {grpo.group_size}, micro-batch {micro}")
            conditions //= 2
        free_memory(env.device)
        if min(micro, conditions) < 1 or env.past_deadline():
            raise RuntimeError(f"out of memory at every size tried before the budget ran out: {attempts}")


def fresh_accelerator(env: Env, mixed_precision: str):
    """An Accelerator with ``mixed_precision``, after clearing accelerate's process-wide state.

    Why the reset: accelerate keeps one ``AcceleratorState`` per process and refuses a second Accelerator
    with another mixed precision; the sections run fp32 and bf16 one after the other in this process.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return make_accelerator(env.workdir, mixed_precision=mixed_precision, log_with=None, cpu=env.device.type == "cpu")


def load_batch(task, split: str, n: int, device: torch.device):
    """``n`` examples of ``split`` (cycling through it when it holds fewer), on ``device``."""
    return batch_to(task.load_examples(split, torch.arange(n) % task.num_examples(split)), device)


def iteration_rows(what: str, precision: str, result: dict) -> list[dict]:
    """The table row of a measured iteration (the collect phase only when the budget cut the update)."""
    detail = (f"{result['conditions']} x {result['group_size']} = {result['rollouts']} rollouts, micro-batch "
              f"{result['micro_batch_size']}")
    if result["memory_before_gib"] is not None:
        detail += f"; {result['memory_before_gib']:.2f} GiB allocated before (weights, optimiser state)"
    if result["out_of_memory_attempts"]:
        detail += f"; out of memory first at: {'; '.join(result['out_of_memory_attempts'])}"
    if "collect_s" in result and "update_s" not in result:
        return [row(f"{what}: collect only (update {result['update']})", precision, result["collect_s"],
                    result["peak_memory_gib"], detail=detail)]
    if "update_s" in result:
        detail += (f"; collect (sampling, decoding, rewards) {result['collect_s']:.2f} s + update "
                   f"{result['update_s']:.2f} s")
    return [row(what, precision, result["iteration_s"], result["peak_memory_gib"],
                result.get("on_policy_ratio_max_dev"), detail)]


# ---------------------------------------------------------------------------------------------
# Sections


def autocast(precision: str, device: torch.device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def egoallo_denoiser(cfg: Config, device: torch.device):
    """EgoAllo's network at the released checkpoint's config (tiny with --dry-run), random weights; checked
    against the checkpoint manifest."""
    from tasks.ego_motion.model.egoallo_checkpoint import EgoAlloConfig, EgoAlloDenoiser, manifest_numel

    config = EgoAlloConfig() if not cfg.dry_run else EgoAlloConfig(
        d_latent=16, d_feedforward=32, d_noise_emb=8, num_heads=2, encoder_layers=1, decoder_layers=1)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(cfg.seed)
        model = EgoAlloDenoiser(config)
    numel = sum(v.numel() for v in model.state_dict().values())
    if numel != manifest_numel(config):
        raise RuntimeError(f"the denoiser holds {numel} numbers but the checkpoint manifest {manifest_numel(config)}")
    return model, numel


def ego_task(cfg: Config, device: torch.device):
    """The ego-motion task with hands (EgoAllo's D = 496), the bundled clips and EgoAllo's sampler."""
    import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
    from tasks.ego_motion.task import EgoMotionTask, EgoMotionTaskConfig

    task = EgoMotionTask(EgoMotionTaskConfig(window_frames=cfg.ego_window_frames, include_hands=True,
                                             num_sampling_steps=cfg.ego_sampling_steps))
    task.body.to(device)
    return task


def ego_label(cfg: Config, numel: int) -> str:
    return f"EgoAllo denoiser ({numel / 1e6:.1f} M), T = {cfg.ego_window_frames}, K = {cfg.ego_sampling_steps}"


def ego_sampling(cfg: Config, env: Env) -> dict:
    task = ego_task(cfg, env.device)
    model, numel = egoallo_denoiser(cfg, env.device)
    model.eval()
    cond = task.encode_condition(load_batch(task, "post_train", cfg.ego_windows, env.device))
    scheduler, sampler = task.make_scheduler(), task.sampler_config()
    rows = []
    for precision in ("fp32", "bf16"):
        def sample(precision: str = precision) -> object:
            streams = RandomStreams.from_seed(cfg.seed, device=env.device)
            with autocast(precision, env.device):
                return sample_chains(task, model, scheduler, sampler, cond, cfg.ego_windows,
                                     micro_batch_size=cfg.ego_micro_batch_size, streams=streams)

        sample()  # warm-up: kernel choice and allocator
        trajectory, seconds, peak = timed(sample, env.device)
        if not bool(torch.isfinite(trajectory.samples).all()):
            raise RuntimeError(f"{precision} sampling produced non-finite samples")
        rows.append(row(f"{ego_label(cfg, numel)}: sampling {cfg.ego_windows} windows", precision, seconds, peak))
    return {"rows": rows, "parameters": numel}


def ego_grpo(cfg: Config, env: Env, precision: str) -> dict:
    task = ego_task(cfg, env.device)
    model, numel = egoallo_denoiser(cfg, env.device)
    grpo = GRPOConfig(num_iterations=1, seed=cfg.seed, conditions_per_iteration=cfg.ego_conditions,
                      group_size=cfg.ego_group_size, micro_batch_size=cfg.ego_micro_batch_size,
                      sampler=task.sampler_config(), perturb=PerturbConfig(name="perlin", scale=0.03),
                      optim=OptimConfig(learning_rate=1e-5), rewards=EGO_REWARDS, train_split="post_train",
                      mixed_precision="bf16" if precision == "bf16" else "no")
    result = measure_iteration(task, model, grpo, env)  # Perlin head perturbation at MotionGRPO's lambda = 0.03 m
    what = f"{ego_label(cfg, numel)}: GRPO iteration"
    return {"rows": iteration_rows(what, precision, result), "parameters": numel, **result}


def t2i_task(cfg: Config, env: Env, family: str):
    """A text-to-image task over a random-weight pipeline of ``family`` (full size; tiny with --dry-run),
    its components frozen and LoRA adapters on the denoiser's attention projections."""
    from tasks.text_to_image import rewards as _image_rewards  # noqa: F401  (registers jpeg_compressibility)
    from tasks.text_to_image.full_size import full_size_pipeline
    from tasks.text_to_image.task import TextToImageTask, TextToImageTaskConfig
    from tasks.text_to_image.tiny import tiny_pipeline

    dtype = getattr(torch, cfg.t2i_dtype)
    if cfg.dry_run:
        pipeline = tiny_pipeline(family, image_size_px=cfg.t2i_image_size_px, seed=cfg.seed).to(env.device, dtype)
    else:
        pipeline = full_size_pipeline(family, device=env.device, dtype=dtype, seed=cfg.seed)
    pipeline.set_progress_bar_config(disable=True)
    task = TextToImageTask(pipeline, {"train": list(PROMPTS)}, TextToImageTaskConfig(
        image_size_px=cfg.t2i_image_size_px, num_inference_steps=cfg.t2i_steps))
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        add_lora(task.denoiser, LoRAConfig(use_lora=True, r=cfg.lora_rank, lora_alpha=float(cfg.lora_rank)))
    return task


def t2i_grpo_config(cfg: Config) -> GRPOConfig:
    return GRPOConfig(num_iterations=1, seed=cfg.seed, conditions_per_iteration=cfg.t2i_conditions,
                      group_size=cfg.t2i_group_size, micro_batch_size=cfg.t2i_micro_batch_size,
                      sampler=SamplerConfig(eta=1.0, guidance_scale=cfg.t2i_guidance_scale),
                      optim=OptimConfig(learning_rate=3e-4, weight_decay=0.0), rewards=("jpeg_compressibility",),
                      mixed_precision="bf16" if cfg.t2i_dtype == "bfloat16" else "no")


def t2i_label(cfg: Config, task, family: str) -> str:
    denoiser = task.denoiser
    total = sum(p.numel() for p in denoiser.parameters())
    trained = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    size = "tiny" if cfg.dry_run else {"unet": "SD 1.5-size", "sd3": "SD3 Medium-size"}[family]
    name = f"{size} {'UNet' if family == 'unet' else 'transformer'}"
    tokens = task.load_examples("train", torch.tensor([0]))["prompt_embeds"].shape[1]
    return (f"{name} ({total / 1e6:.0f} M, LoRA r = {cfg.lora_rank}: {trained / 1e6:.2f} M trained), "
            f"{cfg.t2i_image_size_px} px, {tokens} text tokens, K = {cfg.t2i_steps}, CFG {cfg.t2i_guidance_scale}")


def t2i_grpo(cfg: Config, env: Env, family: str) -> dict:
    task = t2i_task(cfg, env, family)
    result = measure_iteration(task, task.denoiser, t2i_grpo_config(cfg), env)
    what = f"{t2i_label(cfg, task, family)}: GRPO iteration"
    precision = "bf16" if cfg.t2i_dtype == "bfloat16" else "fp32"
    return {"rows": iteration_rows(what, precision, result), **result}


def t2i_forward_process(cfg: Config, env: Env) -> dict:
    if FORWARD_PROCESS_ITERATION is None:
        return {"status": "skipped: the library has no forward-process objective (FORWARD_PROCESS_ITERATION is None)"}
    task = t2i_task(cfg, env, "sd3")
    result = measure_iteration(task, task.denoiser, t2i_grpo_config(cfg), env, step=forward_process_step)
    what = f"{t2i_label(cfg, task, 'sd3')}: forward-process objective iteration"
    return {"rows": iteration_rows(what, "bf16" if cfg.t2i_dtype == "bfloat16" else "fp32", result), **result}


SECTION_FUNCTIONS: dict[str, Callable[[Config, Env], dict]] = {
    "ego_sampling": ego_sampling,
    "ego_grpo_fp32": lambda cfg, env: ego_grpo(cfg, env, "fp32"),
    "ego_grpo_bf16": lambda cfg, env: ego_grpo(cfg, env, "bf16"),
    "t2i_unet": lambda cfg, env: t2i_grpo(cfg, env, "unet"),
    "t2i_sd3": lambda cfg, env: t2i_grpo(cfg, env, "sd3"),
    "t2i_forward_process": t2i_forward_process,
}


# ---------------------------------------------------------------------------------------------
# Running, recording, reporting


def run(cfg: Config) -> dict:
    """Run the sections in order within the budget; returns the results (also written to ``cfg.output``)."""
    device = torch.device(cfg.device if cfg.device != "auto" else "cpu" if cfg.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the full-size check needs a GPU; pass --dry-run for the CPU check of the "
                           "same code paths at tiny sizes")
    results = {"command": report.command_for(cfg), "dry_run": cfg.dry_run, "budget_s": cfg.budget_s,
               "margin_s": cfg.margin_s, "environment": report.environment(device, cfg.git_revision), "sections": {}}
    sizes = cfg.effective()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        env = Env(device=device, deadline=start + cfg.budget_s - cfg.margin_s, workdir=Path(workdir))
        for name in cfg.sections:
            began = time.perf_counter() - start
            record = run_section(name, cfg, sizes, env, began)
            record["section_s"] = time.perf_counter() - start - began
            results["sections"][name] = record
            results["total_s"] = time.perf_counter() - start
            if cfg.output is not None:
                cfg.output.parent.mkdir(parents=True, exist_ok=True)
                cfg.output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def run_section(name: str, cfg: Config, sizes: Config, env: Env, began: float) -> dict:
    """Section ``name``'s record: its results, "skipped: budget" when its reserve no longer fits after ``began``
    seconds, or "failed: <error>" (with the traceback) when it raised."""
    reserve = 0.0 if cfg.dry_run else RESERVE_S[name]
    other = ("t2i_", "lora_") if name.startswith("ego_") else ("ego_",)
    record: dict = {"command": report.command_for(cfg, sections=(name,), include_outputs=False, omit_prefixes=other),
                    "started_at_s": began}
    if began + reserve > cfg.budget_s - cfg.margin_s:
        return {**record, "status": f"skipped: budget ({began:.0f} s elapsed + {reserve:.0f} s reserve > "
                                    f"{cfg.budget_s - cfg.margin_s:.0f} s)"}
    try:
        record.update(SECTION_FUNCTIONS[name](sizes, env))
        record.setdefault("status", "ok")
    except Exception as error:  # recorded, and the next sections still run
        record.update(status=f"failed: {type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
    free_memory(env.device)
    return record


def main(cfg: Config) -> dict:
    results = json.loads(cfg.from_results.read_text()) if cfg.from_results is not None else run(cfg)
    table = report.markdown(results)
    if cfg.write_docs is not None:
        cfg.write_docs.write_text(report.replace_docs_section(cfg.write_docs.read_text(), table))
    print(table, end="")
    return results


if __name__ == "__main__":
    main(tyro.cli(Config))
