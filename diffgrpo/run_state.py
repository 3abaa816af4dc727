"""The state a GRPO run carries from one iteration to the next, and through a checkpoint.

Why a module of its own: starting, checkpointing and resuming a run (optimiser, LR schedule, data
stream, named random streams, KL reference, EMA, probe baseline) and deciding whether a checkpoint may
be resumed under the current configuration are one concern, separate from the loop that uses them
(``diffgrpo.trainer``). A checkpoint records :func:`run_record`, the run's fingerprint (the GRPO config,
the chain, the task, its training data and the job's own settings); a resume under another fingerprint is
refused naming the differences, and fields added after a checkpoint was written resume when they keep
their old behaviour (:data:`FIELDS_ADDED_LATER`). A run that does not resume refuses an output directory
holding checkpoints unless ``GRPOConfig.overwrite_output_dir`` says to start over.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import nn

from diffgrpo.awm import AWMConfig
from diffgrpo.chain import SamplingChain
from diffgrpo.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from diffgrpo.checkpoint_discovery import checkpoint_dir, checkpoint_steps
from diffgrpo.checkpoint_selection import SELECTED_FOLDER
from diffgrpo.config import GRPOConfig
from diffgrpo.ema import ParameterEMA
from diffgrpo.finite_update import FiniteUpdateGuard
from diffgrpo.forward_process import TimestepSampling
from diffgrpo.lora import AdapterDisabledReference, has_lora
from diffgrpo.nft import NFTConfig, OldPolicySchedule
from diffgrpo.probe import probe_logs
from diffgrpo.rng import RandomStreams
from diffgrpo.stream import IndexStream
from diffgrpo.task import Task
from diffgrpo.train_step import frozen_copy

logger = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: GRPOConfig):
    """AdamW and its learning-rate schedule (``OptimConfig.lr_schedule``), stepped once per optimiser step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.learning_rate,
                                  weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, warmup=cfg.optim.warmup_steps, total=cfg.planned_optimizer_steps,
                                     shape=cfg.optim.lr_schedule))
    return optimizer, schedule


def lr_factor(step: int, *, warmup: int, total: int, shape: str) -> float:
    """The learning rate of optimiser step ``step`` (0-based) over the configured one; ``shape``: a checked
    ``OptimConfig.lr_schedule``.

    Warm-up: (step + 1) / (warmup + 1) for the first ``warmup`` steps. Then, with p = (step - warmup) / (total -
    warmup) the fraction of the decay done: 1 ('constant'), 1 - p ('linear') or (1 + cos(pi p)) / 2 ('cosine',
    SGDR's half cosine to 0), so the last of ``total`` steps runs at 1 / (total - warmup) of the rate ('linear').
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if shape == "constant" or total <= warmup:
        return 1.0
    done = min((step - warmup) / (total - warmup), 1.0)
    return 1.0 - done if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


@dataclass
class GRPORun:
    """Everything a GRPO run carries from one iteration to the next (and through a checkpoint)."""

    model: nn.Module
    """The policy, as prepared by accelerate (DDP-wrapped with several processes)."""
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    stream: IndexStream
    """This process's resumable order of training conditions."""
    streams: RandomStreams
    """This process's named random streams (perturbation, initial noise, step noise, step selection)."""
    reference: nn.Module | None
    """The starting policy for the KL term (None without KL): the policy with its LoRA adapters switched
    off when it has adapters (``diffgrpo.lora.AdapterDisabledReference``), else a frozen copy."""
    start: int = 0
    """Iterations already done (> 0 after a resume)."""
    history: dict[str, list[float]] = field(default_factory=dict)
    """Logged scalars of every iteration so far, restored on resume. Probe keys (``probe/...``,
    ``probe_diff/...``) have one entry per probe evaluation, at the iterations in ``probe/iteration``."""
    probe_baseline: dict[str, torch.Tensor] | None = None
    """The probe set's values before training (C, M) per key; paired differences are taken against it."""
    ema: ParameterEMA | None = None
    """Moving average of the trainable weights (``cfg.ema.use_ema``), saved in checkpoints."""
    guard: FiniteUpdateGuard = field(default_factory=FiniteUpdateGuard)
    """Skips (or stops at) non-finite optimiser steps; its counts are saved in checkpoints."""
    run_id: str = ""
    """This run's id (kept through resumes): retention deletes only checkpoints carrying it."""
    old_policy: ParameterEMA | None = None
    """DiffusionNFT's old policy (objective 'nft'): an EMA of the trainable weights with the decay schedule
    of ``cfg.loss.old_policy`` (``diffgrpo.nft.update_old_policy``), saved in checkpoints."""

    def log(self, accelerator, iteration: int, values: dict[str, float]) -> dict[str, float]:
        """Average ``values`` over processes, send them to the trackers and the history."""
        values = _mean_over_processes(accelerator, values)
        accelerator.log(values, step=iteration + 1)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)
        return values

    def log_probe(self, iteration: int, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Record a probe evaluation after ``iteration`` iterations; the first one becomes the baseline.

        Every process evaluates the whole probe set (the same numbers), so nothing is gathered here.
        """
        if self.probe_baseline is None:
            self.probe_baseline = {k: v.clone() for k, v in values.items()}
        logs = {"probe/iteration": float(iteration), **probe_logs(values, self.probe_baseline)}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        return logs

    def save(self, accelerator, output_dir: str | Path, done: int, record: dict, *,
             shared_tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> None:
        """Checkpoint after ``done`` iterations (every process must call this); ``record`` is
        :func:`run_record`, the configuration a resume must match."""
        shared = dict(shared_tensors or {})
        shared.update({f"probe_baseline.{k}": v for k, v in (self.probe_baseline or {}).items()})
        ema_meta = {}
        if self.ema is not None:
            shared.update({f"{EMA_PREFIX}{k}": v for k, v in self.ema.state_tensors().items()})
            ema_meta = {"ema_num_updates": self.ema.num_updates}
        if self.old_policy is not None:
            shared.update({f"{OLD_POLICY_PREFIX}{k}": v for k, v in self.old_policy.state_tensors().items()})
            ema_meta["old_policy_num_updates"] = self.old_policy.num_updates
        if self.reference is not None and not has_lora(self.model):  # a frozen copy: its weights travel along
            shared.update({f"{REFERENCE_PREFIX}{k}": v for k, v in self.reference.state_dict().items()})
        save_checkpoint(accelerator, output_dir, done, model=self.model, optimizer=self.optimizer,
                        lr_scheduler=self.lr_schedule, rank_tensors=self.streams.get_state(),
                        rank_meta={"stream": self.stream.state_dict()}, shared_tensors=shared,
                        meta={"config": json.dumps(record), "history": json.dumps(self.history),
                              "finite_update": self.guard.state_dict(), **ema_meta, **(meta or {})},
                        trainable_only=has_lora(self.model), run_id=self.run_id)


EMA_PREFIX = "ema."
"""Prefix of the EMA's tensors among a checkpoint's shared tensors."""
OLD_POLICY_PREFIX = "old_policy."
"""Prefix of DiffusionNFT's old-policy tensors among a checkpoint's shared tensors."""
REFERENCE_PREFIX = "reference."
"""Prefix of the frozen reference copy's weights (KL guard without LoRA) among a checkpoint's shared tensors.
Why saved: a resumed process may build its model from other weights than the run started from; the
guard must keep pulling towards the run's own starting policy. Under LoRA the reference is the
adapter-disabled base model, whose frozen weights the resumed model carries anyway."""


def run_record(cfg: GRPOConfig, chain: SamplingChain, task: Task | None = None, job: dict | None = None) -> dict:
    """The run's fingerprint, which a checkpoint records and a resume must match (JSON-able).

    ``cfg`` with the chain's sampler settings under ``"sampler"`` (where checkpoints written before the
    chain existed kept them), the chain's timesteps and sample shape under ``"chain"``, the task's class
    and its training data (:func:`data_identity`) under ``"task"`` and ``"data"``, and ``job``: the
    calling job's settings that feed the rewards, the chain or the data (e.g. the ego-motion job's
    ``--perceptual-omega``, ``--rollout-sampling-steps``, ``--no-use-perceptual-reward``).
    """
    record = {**asdict(cfg), "sampler": asdict(chain.sampler),
              "chain": {"timesteps": chain.timesteps.tolist(), "sample_shape": list(chain.sample_shape)},
              "job": job or {}}
    if task is not None:
        record.update(task=f"{type(task).__module__}.{type(task).__qualname__}",
                      data=data_identity(task, cfg.train_split))
    return json.loads(json.dumps(record, default=str))


def data_identity(task: Task, split: str, samples: int = 16) -> dict:
    """What identifies a task's training data: the split, its size and a SHA-256 of up to ``samples``
    evenly spaced examples (every key, in key order; tensors as safetensors bytes, strings as JSON).

    Why a sample and not every example: the check runs at every start; another data set, another filter
    or another order changes the count or one of these examples in all but contrived cases."""
    from safetensors.torch import save as safetensors_bytes

    count = task.num_examples(split)
    digest = hashlib.sha256()
    if count:
        indices = torch.linspace(0, count - 1, min(samples, count)).round().long().unique()
        batch = task.load_examples(split, indices)
        for key in sorted(batch):
            value = batch[key]
            digest.update(key.encode())
            digest.update(safetensors_bytes({key: value.detach().cpu().contiguous().clone()})
                          if isinstance(value, torch.Tensor) else json.dumps(value, default=str).encode())
    return {"split": split, "num_examples": count, "examples_sha256": digest.hexdigest()}


def start_run(task: Task, model: nn.Module, cfg: GRPOConfig, *, accelerator, output_dir: str | Path,
              resume: bool = False, record: dict | None = None) -> tuple[GRPORun, Checkpoint | None]:
    """Optimiser, schedule, data stream and RNG for a run; restored from the newest checkpoint if ``resume``.

    ``record`` (:func:`run_record`; default ``cfg`` alone) is what the checkpoint's config must match.
    Without ``resume``, an output directory holding checkpoints is refused unless
    ``cfg.overwrite_output_dir`` (then they are deleted first). With it, the checkpoint comes from
    ``diffgrpo.checkpoint_discovery.latest_checkpoint`` (the newest intact one); ``cfg.num_iterations``
    below the checkpoint's step is refused.

    Returns the run and the checkpoint it resumed from (None for a fresh start), so a recipe can
    restore its own extra state (e.g. a learned reward model) from ``checkpoint.shared_tensors``.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    if not resume:
        start_over(accelerator, output_dir, overwrite=cfg.overwrite_output_dir)
    optimizer, lr_schedule = make_optimizer(model, cfg)
    reference = reference_policy(model) if cfg.loss.kl_coef > 0 else None
    ema = ParameterEMA(model, cfg.ema.decay) if cfg.ema.use_ema else None
    old_policy = ParameterEMA(model, cfg.loss.old_policy.decay(0)) if cfg.loss.objective == "nft" else None
    model, optimizer = accelerator.prepare(model, optimizer)
    run = GRPORun(model=model, optimizer=optimizer, lr_schedule=lr_schedule,
                  stream=IndexStream(task.num_examples(cfg.train_split), cfg.seed, rank, world),
                  streams=RandomStreams.from_seed(cfg.seed, rank, device=accelerator.device), reference=reference,
                  ema=ema, old_policy=old_policy, guard=FiniteUpdateGuard.from_config(cfg.optim),
                  run_id=_new_run_id(accelerator))
    ckpt = None
    if resume and (path := latest_checkpoint(output_dir)) is not None:
        ckpt = load_checkpoint(accelerator, path, model=model, optimizer=optimizer, lr_scheduler=lr_schedule)
        current = record if record is not None else json.loads(json.dumps(asdict(cfg), default=str))
        check_resumable(json.loads(ckpt.meta.get("config", "{}")), current, path)
        if cfg.num_iterations < ckpt.step:
            raise ValueError(f"--grpo.num-iterations {cfg.num_iterations} is below the {ckpt.step} iterations {path} "
                             f"already holds; pass --grpo.num-iterations {ckpt.step} or more to resume it")
        run.streams.set_state(ckpt.rank_tensors)
        prefix = "probe_baseline."
        baseline = {k[len(prefix):]: v for k, v in ckpt.shared_tensors.items() if k.startswith(prefix)}
        run.probe_baseline = baseline or None
        if ema is not None:
            ema.load_state_tensors({k[len(EMA_PREFIX):]: v for k, v in ckpt.shared_tensors.items()
                                    if k.startswith(EMA_PREFIX)}, int(ckpt.meta.get("ema_num_updates", 0)))
        restore_objective_state(run, ckpt)
        run.stream.load_state_dict(ckpt.rank_meta["stream"])
        run.guard.load_state_dict(ckpt.meta.get("finite_update", {}))
        run.run_id = ckpt.run_id
        run.start = ckpt.step
        run.history = json.loads(ckpt.meta.get("history", "{}"))
        logger.info("resumed from %s at iteration %d", path, run.start)
    elif resume:
        logger.info("--resume given but %s holds no checkpoint: starting from scratch", output_dir)
    return run, ckpt


def start_over(accelerator, output_dir: str | Path, *, overwrite: bool) -> None:
    """Before a run that does not resume: refuse an output directory holding checkpoints, or with
    ``overwrite`` delete them (main process; every process waits)."""
    root = checkpoint_dir(output_dir)
    if not (checkpoint_steps(output_dir) or (root / "latest").exists()):
        return
    if not overwrite:
        names = [p.name for p in checkpoint_steps(output_dir)]
        raise ValueError(f"{root} already holds checkpoints ({', '.join(names[-3:]) or 'a latest pointer'}) and this "
                         "run does not resume: pass --resume to continue that run, --grpo.overwrite-output-dir to "
                         "delete them and start over, or another --output-dir")
    if accelerator.is_main_process:
        logger.warning("--grpo.overwrite-output-dir: deleting %s (and the run's selected checkpoint) and starting "
                       "over", root)
        shutil.rmtree(root)
        for name in (SELECTED_FOLDER, SELECTED_FOLDER + ".old"):
            shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
    accelerator.wait_for_everyone()


def _new_run_id(accelerator) -> str:
    """A fresh random id, the main process's on every process."""
    run_id = uuid.uuid4().hex
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        run_id = broadcast_object_list([run_id])[0]
    return run_id


def restore_objective_state(run: GRPORun, ckpt: Checkpoint) -> None:
    """DiffusionNFT's old policy and the frozen reference copy from ``ckpt``, so a resume stays bit-exact."""
    if run.old_policy is not None:
        run.old_policy.load_state_tensors({k[len(OLD_POLICY_PREFIX):]: v for k, v in ckpt.shared_tensors.items()
                                           if k.startswith(OLD_POLICY_PREFIX)},
                                          int(ckpt.meta.get("old_policy_num_updates", 0)))
    saved = {k[len(REFERENCE_PREFIX):]: v for k, v in ckpt.shared_tensors.items() if k.startswith(REFERENCE_PREFIX)}
    if run.reference is not None and not has_lora(run.model):
        if not saved:
            raise ValueError("the checkpoint holds no KL reference weights (it was written without "
                             "--grpo.loss.kl-coef); resume with the same flags")
        with torch.no_grad():
            for name, tensor in run.reference.state_dict().items():
                tensor.copy_(saved[name].to(tensor.device))


def reference_policy(model: nn.Module) -> nn.Module:
    """The KL reference: the policy with its LoRA adapters switched off if it has any (no copy of the
    weights), else a frozen copy of the starting weights."""
    return AdapterDisabledReference(model) if has_lora(model) else frozen_copy(model)


RESUMABLE_CHANGES = ("num_iterations", "checkpoint_every", "overwrite_output_dir")
"""GRPOConfig fields a resumed run may change (e.g. to extend a finished run); any other change is refused."""

FIELDS_ADDED_LATER = {("sampler", "guidance_scale"): 1.0, ("rollout_chunks",): 1,
                      ("sampler", "noise_frequencies"): None, ("sampler", "noise_features"): None,
                      ("ema",): {"use_ema": False, "decay": 0.9, "use_for_eval": False}, ("perturb", "params"): [],
                      ("optim", "on_nonfinite"): "skip", ("optim", "max_consecutive_nonfinite"): 3,
                      ("optim", "lr_schedule"): "constant",
                      **{("loss", name): json.loads(json.dumps(asdict(value)))
                         for name, value in (("nft", NFTConfig()), ("old_policy", OldPolicySchedule()),
                                             ("awm", AWMConfig()), ("forward_timesteps", TimestepSampling()))},
                      ("loss", "timesteps_per_sample"): 1, ("selection",): {"metric": None, "mode": "min"}}
"""Config fields newer than some checkpoints, with the value that reproduces the older behaviour: a
checkpoint without one resumes when the current run keeps that value. (The non-finite policy: a run whose
updates are all finite, as every resumable older one is, steps the same under 'skip'.)"""

FINGERPRINT_ADDED_LATER = ("chain", "task", "data", "job")
"""Parts of the fingerprint (:func:`run_record`) that checkpoints written before them lack: such a
checkpoint resumes with a WARNING that these parts could not be compared."""


def with_added_fields(saved: dict) -> dict:
    """``saved`` with every field of :data:`FIELDS_ADDED_LATER` it lacks set to its old-behaviour value."""
    out = json.loads(json.dumps(saved))
    for path, value in FIELDS_ADDED_LATER.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    return out


def check_resumable(saved: dict, current: dict, path) -> None:
    """Refuse to continue a checkpoint under a different fingerprint (it would silently mix two runs)."""
    if not saved:
        raise ValueError(f"{path} records no config; it was not written by train_grpo, so it cannot be resumed")
    saved = with_added_fields(saved)
    unrecorded = [k for k in FINGERPRINT_ADDED_LATER if k in current and k not in saved]
    if unrecorded:
        logger.warning("%s predates the run fingerprint's %s: resuming without comparing them", path, unrecorded)
    schedule = (current.get("optim") or {}).get("lr_schedule", "constant")
    if schedule != "constant" and saved.get("num_iterations") != current.get("num_iterations"):
        raise ValueError(f"--resume with num_iterations {current.get('num_iterations')} where {path} was written with "
                         f"{saved.get('num_iterations')}: the learning rate decays ('{schedule}') over the run's "
                         "iterations, so the iterations already run would have had another rate; resume with "
                         f"--grpo.num-iterations {saved.get('num_iterations')}, or start a new --output-dir")
    changed = {k: _difference(saved.get(k), current[k]) for k in current
               if k not in RESUMABLE_CHANGES and k not in unrecorded and saved.get(k) != current[k]}
    if changed:
        raise ValueError(f"--resume with a different configuration than {path} was written with (saved, now): "
                         f"{changed}; resume with the same flags, or start a new --output-dir")


def _difference(saved, now):
    """(saved, now), narrowed to the differing keys when both are mappings (a job's or the data's fields)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return {k: _difference(saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)}
    return (saved, now)


def _mean_over_processes(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the processes that report it; a non-finite value makes it NaN.

    Why one gather of the whole dict rather than a collective per key: a process may lack a key
    (no loss term of its own this iteration, every group dropped), and a collective per key would
    then pair different keys across processes, or wait forever.
    """
    if accelerator.num_processes == 1:
        return {k: float(v) for k, v in values.items()}
    reported = gather_object([dict(values)])  # one dict per process, in rank order
    keys = dict.fromkeys(k for d in reported for k in d)
    return {k: float(torch.tensor([float(d[k]) if math.isfinite(d[k]) else float("nan")
                                   for d in reported if k in d]).mean()) for k in keys}
