"""GRPO post-training of a diffusers text-to-image pipeline (SD 1.x/2.x UNet or SD3 transformer), with LoRA.

Loads ``--pipeline`` (a folder or a hub id) with ``DiffusionPipeline.from_pretrained``, adds LoRA
adapters to its denoiser (``--lora.*``), post-trains them with GRPO on the prompts against the
registered rewards (``--grpo.rewards``; DDPO's JPEG rewards by default), evaluates a fixed probe
set of prompts x noises before and after (paired differences with 95 % intervals) and writes
``results.json``, ``results.md`` (the before/after table) and the adapters in diffusers' LoRA
format (``lora/``, for ``pipeline.load_lora_weights``; with ``--grpo.ema.use-ema`` also ``lora_ema/``,
the moving average) into ``--output-dir``. Checkpoints record the ``--lora.*`` and ``--task.*``
settings, and ``--resume`` refuses other ones. See ``docs/text_to_image.md``.

    accelerate launch recipes/text_to_image.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --torch-dtype bfloat16 --grpo.mixed-precision bf16
    python recipes/text_to_image.py --pipeline runs/tiny_sd --tiny-pipeline unet   # tiny random, CPU
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from diffgrpo.chain import SamplingChain
from diffgrpo.checkpoint import Checkpoint, latest_checkpoint, read_shared_state
from diffgrpo.cli import parse
from diffgrpo.config import GRPOConfig, OptimConfig, ProbeConfig, SamplerConfig
from diffgrpo.ema import ParameterEMA
from diffgrpo.launch import make_accelerator
from diffgrpo.lora import LoRAConfig, add_lora
from diffgrpo.rewards import RewardSet, RewardSpec
from diffgrpo.run_state import EMA_PREFIX
from diffgrpo.trainer import LoopHooks, parse_reward_specs, train_grpo
from tasks.text_to_image import rewards as _image_rewards  # noqa: F401  (registers jpeg_compressibility, ...)
from tasks.text_to_image.task import TextToImageTask, TextToImageTaskConfig, save_lora_weights
from tasks.text_to_image.tiny import save_tiny_pipeline

logger = logging.getLogger("recipes.text_to_image")

TRAIN_PROMPTS = ("a cat", "a dog", "a horse", "a monkey", "a rabbit", "a zebra", "a spider", "a bird", "a sheep",
                 "a deer", "a cow", "a goat", "a lion", "a tiger", "a bear", "a raccoon", "a fox", "a wolf",
                 "a lizard", "a beetle", "an ant", "a butterfly", "a fish", "a shark", "a whale", "a dolphin",
                 "a squirrel", "a mouse", "a rat", "a snake", "a turtle", "a frog")
"""Default training prompts: simple animals, as in DDPO's compressibility experiments."""
TEST_PROMPTS = ("a chicken", "a duck", "a goose", "a bee", "a pig", "a turkey", "a fly", "a llama", "a camel",
                "a bat", "a gorilla", "a hedgehog", "a kangaroo", "an owl", "a crab", "a penguin")
"""Default held-out prompts (the probe's "test" split): animals absent from the training prompts."""


def default_grpo() -> GRPOConfig:
    return GRPOConfig(
        num_iterations=100,
        conditions_per_iteration=8,
        group_size=8,
        micro_batch_size=8,
        optim=OptimConfig(learning_rate=3e-4, weight_decay=0.0),
        rewards=("jpeg_compressibility",),
        probe=ProbeConfig(conditions_per_split=16, noises_per_condition=2, eval_every=20),
        checkpoint_every=20,
    )


@dataclass(frozen=True)
class Config:
    """GRPO with LoRA on a diffusers text-to-image pipeline."""

    pipeline: str = ""
    """The pipeline: a folder written by save_pretrained or a hub id (StableDiffusionPipeline or
    StableDiffusion3Pipeline)."""
    output_dir: Path = Path("runs/text_to_image")
    """Checkpoints, TensorBoard logs, results.json, results.md and the LoRA weights (lora/, and lora_ema/ with
    --grpo.ema.use-ema) go here."""
    tiny_pipeline: Literal["unet", "sd3"] | None = None
    """Build a tiny random-weight pipeline of this family into --pipeline first (if that folder holds none):
    the CPU demonstration, no download."""
    tiny_image_size_px: int = 32
    """Image size of the tiny pipeline (with --tiny-pipeline)."""
    torch_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """dtype the pipeline's weights are loaded in (the LoRA adapters always train in float32)."""
    drop_text_encoder_3: bool = False
    """SD3: load without the T5 text encoder (its part of the prompt embedding is then zeros; saves ~9 GB
    in bf16). Needed for a pipeline saved without one, e.g. the tiny SD3."""
    use_gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass (diffusers' enable_gradient_checkpointing):
    much less activation memory for about a third more update time; sampling is unchanged."""
    prompts_file: Path | None = None
    """Training prompts, one per line (default: 32 simple animals)."""
    test_prompts_file: Path | None = None
    """Held-out prompts for the probe's test split, one per line (default: 16 other animals)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    threads: int = 0
    """torch CPU threads (0: torch's default)."""
    results: Path | None = None
    """Also write the results JSON here (e.g. docs/data/text_to_image_cpu.json)."""
    table_output: Path | None = None
    """Also write the markdown before/after table here."""
    reward_params: str = "{}"
    """JSON {reward name: {parameter: value}} for rewards that take parameters, e.g.
    '{"remote": {"url": "http://127.0.0.1:8000", "batch_keys": ["prompt"]}}' (docs/remote_rewards.md)."""
    task: TextToImageTaskConfig = field(default_factory=TextToImageTaskConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(use_lora=True))
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(eta=1.0, guidance_scale=4.5, log_prob_reduction="mean"))
    """The rollouts' stochastic step and guidance (``--sampler.*``; ``--grpo.sampler.*`` is a deprecated
    spelling)."""
    grpo: GRPOConfig = field(default_factory=default_grpo)

    def __post_init__(self) -> None:
        if not self.pipeline:
            raise ValueError("pass --pipeline PATH_OR_HUB_ID (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
        if self.grpo.probe.eval_every == 0:
            raise ValueError("the before/after table comes from the probe set: pass --grpo.probe.eval-every N (> 0)")
        if self.tiny_pipeline is not None and Path(self.pipeline).exists() and not (
                Path(self.pipeline) / "model_index.json").exists():
            raise ValueError(f"--tiny-pipeline would write into {self.pipeline}, which exists but holds no pipeline; "
                             "pass a new folder")
        if self.tiny_pipeline == "sd3" and not self.drop_text_encoder_3:
            raise ValueError("the tiny SD3 pipeline has no T5 text encoder: add --drop-text-encoder-3")
        try:
            params = json.loads(self.reward_params)
        except json.JSONDecodeError as error:
            raise ValueError(f"--reward-params is not JSON ({error}); pass e.g. "
                             '\'{"remote": {"url": "http://127.0.0.1:8000"}}\'') from None
        named = set(parse_reward_specs(self.grpo.rewards))
        if not isinstance(params, dict) or not set(params) <= named:
            raise ValueError(f"--reward-params must map rewards named in --grpo.rewards {self.grpo.rewards} to their "
                             f"parameters, got {params!r}")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = torch's default)")


def read_prompts(path: Path | None, default: tuple[str, ...]) -> list[str]:
    """Non-empty lines of ``path`` (stripped), or ``default``."""
    if path is None:
        return list(default)
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt; write one prompt per line")
    return prompts


def load_pipeline(cfg: Config):
    """``DiffusionPipeline.from_pretrained`` with the dtype, without a safety checker, optionally without T5."""
    from diffusers import DiffusionPipeline

    components = DiffusionPipeline.load_config(cfg.pipeline)
    kwargs = {"torch_dtype": getattr(torch, cfg.torch_dtype)}
    if "safety_checker" in components:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if cfg.drop_text_encoder_3:
        if "text_encoder_3" not in components:
            raise ValueError(f"--drop-text-encoder-3: {cfg.pipeline} has no text_encoder_3 (not an SD3 pipeline)")
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    return DiffusionPipeline.from_pretrained(cfg.pipeline, **kwargs)


SETTINGS_META = "text_to_image_settings"
"""Checkpoint metadata key of the recipe's --lora.* and --task.* settings (train_grpo checks only --grpo.*)."""


def recipe_settings(cfg: Config) -> dict[str, dict]:
    """The settings a resumed run must share with its checkpoint besides the GRPOConfig, as JSON values."""
    return json.loads(json.dumps({"lora": dataclasses.asdict(cfg.lora), "task": dataclasses.asdict(cfg.task)}))


def settings_hooks(cfg: Config) -> LoopHooks:
    """Save the recipe's settings with each checkpoint and refuse a resume under other ones, naming the flags.

    Why: the adapters' shapes catch a new --lora.r or --lora.target-modules, but nothing else would catch a
    new --lora.lora-alpha (another scale on the same weights) or --task.num-inference-steps (another chain).
    """
    current = recipe_settings(cfg)

    def shared_state() -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {SETTINGS_META: json.dumps(current)}

    def load_shared_state(ckpt: Checkpoint) -> None:
        if SETTINGS_META not in ckpt.meta:
            raise ValueError(f"{ckpt.path} records no --lora.* / --task.* settings (written before they were "
                             "saved), so a resume cannot be checked; start a new --output-dir")
        saved = json.loads(ckpt.meta[SETTINGS_META])
        changed = {f"--{group}.{name.replace('_', '-')}": (saved.get(group, {}).get(name), value)
                   for group, values in current.items() for name, value in values.items()
                   if saved.get(group, {}).get(name) != value}
        if changed:
            raise ValueError(f"--resume with other settings than {ckpt.path} was written with (saved, now): {changed}; "
                             "resume with the same flags, or start a new --output-dir")

    return LoopHooks(shared_state=shared_state, load_shared_state=load_shared_state)


def final_ema(model: torch.nn.Module, cfg: Config) -> ParameterEMA:
    """The run's moving average of ``model``'s trainable weights, read from its final checkpoint (train_grpo
    always writes one after the last iteration)."""
    path = latest_checkpoint(cfg.output_dir)
    if path is None:
        raise FileNotFoundError(f"{cfg.output_dir} holds no checkpoint to read the EMA weights from")
    tensors, meta = read_shared_state(path, prefix=EMA_PREFIX)
    if int(path.name.removeprefix("step_")) != cfg.grpo.num_iterations:
        raise ValueError(f"the newest checkpoint {path} is not the run's last ({cfg.grpo.num_iterations} iterations)")
    ema = ParameterEMA(model, cfg.grpo.ema.decay)
    ema.load_state_tensors({k[len(EMA_PREFIX):]: v for k, v in tensors.items()}, int(meta["ema_num_updates"]))
    return ema


def probe_results(history: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per probe quantity (``reward/<split>/<name>``, ``metric/<split>/<name>``): its mean before training,
    after the last iteration, and the paired change with its 95 % interval (``diffgrpo.probe``)."""
    out = {}
    for key, values in history.items():
        if not key.startswith("probe/") or key == "probe/iteration":
            continue
        name = key[len("probe/"):]
        diff = f"probe_diff/{name}"
        out[name] = {"before": values[0], "after": values[-1], "change": history[diff][-1],
                     "ci_low": history[f"{diff}/ci_low"][-1], "ci_high": history[f"{diff}/ci_high"][-1]}
    return out


def results_table(results: dict) -> str:
    """The markdown before/after table of a results JSON written by this recipe."""
    probe = results["probe"]
    lines = [f"| probe quantity | before | after ({results['iterations']} it.) | paired change | 95 % interval |",
             "|---|---:|---:|---:|---|"]
    for name, row in probe.items():
        split_rewards = [n for n in probe if n.startswith(name.rsplit("/", 1)[0] + "/")]
        if name.endswith("/total") and name.startswith("reward/") and len(split_rewards) == 2:
            continue  # one reward: its total is the same row again
        resolved = "excludes 0" if row["ci_low"] > 0 or row["ci_high"] < 0 else "contains 0"
        lines.append(f"| {name} | {row['before']:.4f} | {row['after']:.4f} | {row['change']:+.4f} | "
                     f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] ({resolved}) |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = make_accelerator(cfg.output_dir, mixed_precision=cfg.grpo.mixed_precision)
    accelerator.init_trackers("text_to_image", config={"seed": cfg.grpo.seed})
    if cfg.tiny_pipeline is not None and not (Path(cfg.pipeline) / "model_index.json").exists():
        if accelerator.is_main_process:
            save_tiny_pipeline(cfg.tiny_pipeline, cfg.pipeline, image_size_px=cfg.tiny_image_size_px)
        accelerator.wait_for_everyone()
    pipeline = load_pipeline(cfg).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = {"train": read_prompts(cfg.prompts_file, TRAIN_PROMPTS),
               "test": read_prompts(cfg.test_prompts_file, TEST_PROMPTS)}
    task = TextToImageTask(pipeline, prompts, cfg.task)
    chain = SamplingChain.of(task, cfg.sampler, eta_flag="--sampler.eta")
    for component in pipeline.components.values():  # only the denoiser (its adapters) trains
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    model = task.denoiser
    if cfg.lora.use_lora:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.grpo.seed)  # the adapters' random A matrices
            add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    if cfg.use_gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %d trainable parameters of %d", type(model).__name__, trainable,
                sum(p.numel() for p in model.parameters()))

    params = json.loads(cfg.reward_params)
    rewards = RewardSet.from_specs([RewardSpec(name, weight, params.get(name, {}))
                                    for name, weight in parse_reward_specs(cfg.grpo.rewards).items()])
    start = time.perf_counter()
    with rewards:  # the worker thread of --grpo.rollout-chunks > 1 is released at the end
        history = train_grpo(task, model, cfg.grpo, accelerator=accelerator, output_dir=cfg.output_dir,
                             resume=cfg.resume, rewards=rewards, hooks=settings_hooks(cfg), chain=chain)
    seconds = time.perf_counter() - start
    accelerator.end_training()
    results = {
        "command": "python recipes/text_to_image.py " + shlex.join(sys.argv[1:]),
        "pipeline": cfg.pipeline, "family": task.family, "image_size_px": task.image_size_px,
        "trainable_parameters": trainable, "iterations": cfg.grpo.num_iterations, "train_seconds": seconds,
        "num_processes": accelerator.num_processes,
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(accelerator.device) / 1e9
                               if accelerator.device.type == "cuda" else None),
        "probe": probe_results(history),
        "reward_per_iteration": {k: v for k, v in history.items() if k.startswith("reward/")},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        table = results_table(results)
        for path in (cfg.output_dir / "results.json", cfg.results):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=2) + "\n")
        for path in (cfg.output_dir / "results.md", cfg.table_output):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(table)
        if cfg.lora.use_lora:
            save_lora_weights(pipeline, cfg.output_dir / "lora")  # the final adapters
            if cfg.grpo.ema.use_ema:  # their moving average, what --grpo.ema.use-for-eval reports
                with final_ema(model, cfg).swapped_in(model):
                    save_lora_weights(pipeline, cfg.output_dir / "lora_ema")
        print(table)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(parse(Config, renamed={"--grpo.sampler.": "--sampler."}))
