"""Pretrain the EgoAllo-style motion prior p(body motion | head trajectory) (docs/ego_motion_prior.md).

Importable (other recipes and the tests run it); ``recipes/pretrain_ego_motion.py`` is its command line.

Why a pretraining recipe: GRPO post-trains a prior that already solves the task reasonably well.
This recipe trains the x0-prediction denoiser of ``tasks/ego_motion/model/network.py`` on windows of
AMASS-layout motion (the bundled CMU clips by default), conditioned on the encoded head (CPF)
trajectory of the same window:

    for step in range(steps):
        indices = stream.next(batch_size)              # resumable, sharded order over train windows
        batch = windows.get(indices)                   # head poses + body targets
        loss = diffusion_loss(model, scheduler, batch)  # t ~ U, x_t = add_noise(x0, eps, t), weighted x0 MSE
        AdamW step (warm-up, then constant lr; gradient clip)

Run:
    accelerate launch recipes/pretrain_ego_motion.py                       # demo size, bundled CMU clips
    accelerate launch recipes/pretrain_ego_motion.py --preset reference --data-dir ~/amass   # the paper's size
    accelerate launch recipes/pretrain_ego_motion.py --resume               # continue the newest checkpoint
    accelerate launch recipes/pretrain_ego_motion.py --extra-prior-train-dir runs/reactidle_amass  # + idle clips

Writes to ``--output-dir``: ``checkpoints/`` (exact-resume state), ``logs/`` (TensorBoard: loss per
term and total, lr, grad norm), ``denoiser.safetensors`` (weights + config, ``network.load_denoiser``)
and ``metrics.json`` (config, git revision, loss curve, wall time, held-out quick check).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from typing_extensions import assert_never

from diffgrpo.checkpoint import git_revision, latest_checkpoint, load_checkpoint, save_checkpoint
from diffgrpo.launch import make_accelerator
from diffgrpo.rng import make_generator
from diffgrpo.stream import IndexStream
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.data.sequences import WindowConfig
from tasks.ego_motion.data.splits import DataSource, extra_split_files
from tasks.ego_motion.data.windows import load_windows
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, load_denoiser, save_denoiser
from tasks.ego_motion.model.prior import diffusion_loss, evaluate_prior, make_scheduler, mean_pose

logger = logging.getLogger(__name__)

Preset = Literal["demo", "reference", "tiny"]


@dataclass(frozen=True)
class PresetDefaults:
    """Settings that depend on the model size; a flag left at None takes the preset's value."""

    window_frames: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    steps: int


PRESETS: dict[str, PresetDefaults] = {
    # EgoAllo's published recipe (docs/ego_motion_prior.md).
    "reference": PresetDefaults(window_frames=128, batch_size=256, learning_rate=1e-4, warmup_steps=1000,
                                steps=200_000),
    # 2 CPU cores, bundled CMU clips (most clips are 3-15 s, so 64-frame windows); lr measured in
    # docs/ego_motion_prior.md: 1e-3 reaches a given loss several times sooner than 1e-4 at this size.
    "demo": PresetDefaults(window_frames=64, batch_size=32, learning_rate=1e-3, warmup_steps=100, steps=7000),
    # Seconds-long smoke runs and the recipe's tests; not a useful prior.
    "tiny": PresetDefaults(window_frames=32, batch_size=4, learning_rate=1e-3, warmup_steps=2, steps=20),
}


@dataclass(frozen=True)
class Config:
    """Diffusion pretraining of the ego_motion prior; None-valued settings come from --preset."""

    seed: int = 0
    """Seeds the initial weights, the window order and every noise/timestep draw."""
    preset: Preset = "demo"
    """Model size: 'demo' (W 128, 2+2 layers, 1.19 M parameters), 'reference' (W 512, 6+6, 47.2 M) or
    'tiny' (W 32, 1+1 layers: smoke tests only)."""
    window_frames: int | None = None
    """Frames T per training window (None: demo 64, reference 128)."""
    batch_size: int | None = None
    """Windows per optimiser step *per process* (None: demo 32, reference 256)."""
    steps: int | None = None
    """Optimiser steps in total (None: demo 7000, about 30 min on 2 shared CPU cores; reference 200000)."""
    learning_rate: float | None = None
    """Peak AdamW learning rate (None: demo 1e-3, reference 1e-4); constant after warm-up."""
    warmup_steps: int | None = None
    """Steps of linear learning-rate warm-up from 0 (None: demo 100, reference 1000)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Passed to accelerate (fp16 needs a GPU); the loss itself is computed in float32."""
    data_dir: Path | None = None
    """AMASS directory (EgoAllo split: test = Transitions_mocap, SSM_synced); None: the bundled CMU clips."""
    extra_prior_train_dir: Path | None = None
    """A folder of AMASS .npz clips added to the prior_train windows only (never post_train or test), e.g. the
    ReActIdle idle clips built by `python -m tasks.ego_motion.data.convert --reactidle` (runs/reactidle_amass);
    None: none. Needs --train-split prior_train."""
    train_split: Literal["prior_train", "train", "post_train"] = "prior_train"
    """Windows the prior learns from: 'prior_train' leaves the post_train clips unseen, so GRPO post-trains
    where the prior has room (the shipped demo prior); 'train' uses every non-test clip; 'post_train' with
    --init-from is the supervised baseline GRPO is compared with (continued diffusion training on GRPO's data)."""
    init_from: Path | None = None
    """Start from these denoiser weights (a .safetensors from this recipe) instead of a fresh model; the
    preset must match its architecture. The optimiser starts fresh."""
    cache_dir: Path | None = None
    """Where processed windows are cached (None: $DIFFGRPO_CACHE/ego_motion or ~/.cache/diffgrpo/ego_motion)."""
    output_dir: Path = Path("runs/ego_prior")
    """Checkpoints, TensorBoard logs, denoiser.safetensors and metrics.json go here."""
    checkpoint_every: int = 500
    """Steps between checkpoints (one is always written after the last step); 0: only the last."""
    resume: bool = False
    """Continue from the newest checkpoint in --output-dir (bit-exact with the same process count)."""
    log_every: int = 25
    """Steps between logged loss values (means over those steps)."""
    eval_windows: int = 64
    """Held-out test windows (the first ones, at most all) sampled after training for the quick MPJPE check
    (0: skip); one 30-step EgoAllo-sampler draw each (eta 0.8), against a mean-pose baseline."""
    num_threads: int | None = None
    """torch CPU threads (None: torch's default). On a CPU shared with other jobs 1 is often fastest."""
    use_progress_bar: bool = True
    """Show a tqdm progress bar."""

    def __post_init__(self) -> None:
        for name in ("window_frames", "batch_size", "steps", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or omitted for the preset), got {value}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        for name in ("warmup_steps", "checkpoint_every", "eval_windows"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be >= 1, got {self.log_every}")
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise FileNotFoundError(f"--init-from {self.init_from} does not exist; pass a denoiser .safetensors")
        if self.train_split == "post_train" and self.init_from is None:
            raise ValueError("--train-split post_train trains on the post-training clips only; it is meant as the "
                             "supervised baseline, so pass --init-from PRIOR as well")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise ValueError(f"--data-dir {self.data_dir} is not a directory; pass a folder of AMASS .npz files "
                             "or omit it for the bundled CMU clips")
        if self.extra_prior_train_dir is not None:
            if self.train_split != "prior_train":
                raise ValueError(f"--extra-prior-train-dir adds clips to prior_train only, but --train-split is "
                                 f"{self.train_split}; pass --train-split prior_train or drop --extra-prior-train-dir")
            extra_split_files(self.extra_prior_train_dir, "prior_train")  # raises, naming the fix, if missing or empty

    def resolved(self) -> Config:
        """This config with every None setting replaced by the preset's value."""
        defaults = asdict(PRESETS[self.preset])
        values = {k: (defaults[k] if getattr(self, k) is None else getattr(self, k)) for k in defaults}
        return Config(**{**asdict(self), **values})

    def denoiser_config(self) -> DenoiserConfig:
        if self.preset == "demo":
            return DenoiserConfig.demo()
        elif self.preset == "reference":
            return DenoiserConfig.reference()
        elif self.preset == "tiny":
            return DenoiserConfig(width=32, ff_dim=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                                  timestep_features=16)
        else:
            assert_never(self.preset)


def main(cfg: Config) -> dict:
    """Train, checkpoint, save the denoiser and return the metrics.json record."""
    cfg = cfg.resolved()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(output_dir, mixed_precision=cfg.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes

    # Data: train windows in a resumable, sharded order; the condition is encoded inside the loss.
    source = DataSource(extra_prior_train_dir=cfg.extra_prior_train_dir) if cfg.data_dir is None else \
        DataSource(root=cfg.data_dir, split_rule="egoallo", extra_prior_train_dir=cfg.extra_prior_train_dir)
    window_cfg = WindowConfig(window_frames=cfg.window_frames)
    with accelerator.main_process_first():  # the main process builds the cache, the others read it
        train = load_windows(cfg.train_split, source=source, config=window_cfg, cache_dir=cfg.cache_dir)
    stream = IndexStream(len(train), cfg.seed, rank, world)
    generator = make_generator(cfg.seed, "pretrain_ego_motion", rank)  # timesteps and noise (CPU)

    # Model, schedule, optimiser: AdamW, linear warm-up to the peak lr, then constant (EgoAllo).
    torch.manual_seed(cfg.seed)  # initial weights, identical on every process
    model = MotionDenoiser(cfg.denoiser_config())
    if cfg.init_from is not None:
        initial = load_denoiser(cfg.init_from)
        if initial.config != model.config:
            raise ValueError(f"--init-from {cfg.init_from} holds a {initial.config} denoiser but --preset {cfg.preset} "
                             "builds another; pass the preset it was trained with")
        model.load_state_dict(initial.state_dict())
    include_hands = model.config.include_hands
    scheduler = make_scheduler()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (cfg.warmup_steps + 1)))
    model, optimizer = accelerator.prepare(model, optimizer)

    start, history, train_seconds = 0, {}, 0.0
    if cfg.resume and (path := latest_checkpoint(output_dir)) is not None:
        ckpt = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, lr_scheduler=lr_schedule)
        generator.set_state(ckpt.rank_tensors["generator"])
        stream.load_state_dict(ckpt.rank_meta["stream"])
        start, history = ckpt.step, json.loads(ckpt.meta["history"])
        train_seconds = float(ckpt.meta["train_seconds"])
        logger.info("resumed from %s at step %d", path, start)
    elif cfg.resume:
        logger.info("--resume given but %s holds no checkpoint: starting from scratch", output_dir)
    accelerator.init_trackers("pretrain_ego_motion", config=_hparams(cfg))
    if accelerator.is_main_process:
        n_params = accelerator.unwrap_model(model).num_parameters()
        logger.info("%s denoiser: %d parameters; %d train windows of %d frames; %d process(es) x batch %d",
                    cfg.preset, n_params, len(train), cfg.window_frames, world, cfg.batch_size)

    model.train()
    window: dict[str, list[float]] = {}
    tick = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="pretrain", initial=start, total=cfg.steps,
               disable=not (cfg.use_progress_bar and accelerator.is_main_process))
    for step in bar:
        indices = stream.next(cfg.batch_size)
        batch = {k: v.to(accelerator.device) for k, v in train.get(indices).items()}
        with accelerator.autocast():
            out = diffusion_loss(model, scheduler, batch, generator, include_hands=include_hands)
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)

        logs = {"loss/total": out.loss.detach(), **{f"loss/{k}": v for k, v in out.terms.items()},
                "grad_norm": torch.as_tensor(grad_norm).detach().float()}
        for key, value in accelerator.reduce({k: v.float() for k, v in logs.items()}, reduction="mean").items():
            window.setdefault(key, []).append(float(value))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            means["lr"] = lr_schedule.get_last_lr()[0]
            accelerator.log(means, step=done)
            history.setdefault("step", []).append(done)
            for key, value in means.items():
                history.setdefault(key, []).append(value)
            bar.set_postfix(loss=f"{means['loss/total']:.4f}")
            window = {}
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            train_seconds += time.perf_counter() - tick
            save_checkpoint(accelerator, output_dir, done, model=model, optimizer=optimizer,
                            lr_scheduler=lr_schedule, rank_tensors={"generator": generator.get_state()},
                            rank_meta={"stream": stream.state_dict()},
                            meta={"config": json.dumps(_hparams(cfg)), "history": json.dumps(history),
                                  "train_seconds": train_seconds})
            tick = time.perf_counter()

    # Final weights, then a quick held-out check: one 30-step sample per test window vs. the mean pose.
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    quick: dict[str, float] = {}
    if accelerator.is_main_process:
        save_denoiser(output_dir / "denoiser.safetensors", unwrapped)
        if cfg.eval_windows:
            test = load_windows("test", source=source, config=window_cfg, cache_dir=cfg.cache_dir)
            count = min(cfg.eval_windows, len(test))
            baseline = mean_pose(train.get(torch.randperm(len(train), generator=make_generator(cfg.seed, "mean"))
                                           [:512]))
            errors = evaluate_prior(unwrapped, scheduler, load_body_model(), test.get(range(count)), baseline,
                                    make_generator(cfg.seed, "eval"), include_hands=include_hands)
            quick = {k: float(v.mean()) for k, v in errors.items()} | {"eval_windows": count}
            accelerator.log({f"eval/{k}": v for k, v in quick.items()}, step=cfg.steps)
        final = {k: history[k][-1] for k in history if k.startswith("loss/")}
        record = {"config": _hparams(cfg), "git_revision": git_revision(), "steps": cfg.steps,
                  "train_seconds": train_seconds, "final_losses": final, "quick_check": quick,
                  "num_parameters": unwrapped.num_parameters(), "history": history}
        (output_dir / "metrics.json").write_text(json.dumps(record, indent=1))
        logger.info("trained %d steps in %.0f s; final losses %s; quick check %s", cfg.steps, train_seconds,
                    {k: round(v, 5) for k, v in final.items()}, {k: round(v, 1) for k, v in quick.items()})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record if accelerator.is_main_process else {}


def _hparams(cfg: Config) -> dict[str, int | float | str | bool]:
    """The config as flat scalars (TensorBoard's hparams and the JSON records accept nothing else)."""
    return {k: v if isinstance(v, (int, float, bool, str)) else str(v) for k, v in asdict(cfg).items()}

