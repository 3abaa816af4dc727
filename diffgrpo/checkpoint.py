"""Atomic safetensors checkpoints that hold everything an exact resume needs.

Why not ``accelerator.save_state``: it pickles the optimiser and RNG states. Here every tensor
(model, optimiser moments, RNG states, task state such as a learned reward model) goes into
safetensors and every non-tensor (step, LR schedule, optimiser hyper-parameters, data position,
config, git revision) into its JSON metadata. Nothing is unpickled on load.

Layout of ``<output_dir>/checkpoints/``::

    step_000010/shared.safetensors   model + optimiser + shared task state (main process)
    step_000010/rank_0.safetensors   this process's RNG streams and data position (every rank)
    latest                           name of the newest complete checkpoint

With ``trainable_only=True`` (LoRA) the model part holds only the parameters that require
gradients, the adapters: the frozen base weights are the pipeline's own and are not copied into
every checkpoint; loading checks that every trainable parameter is restored (metadata
``model_state``: "trainable"; "full" or absent, as in checkpoints written before it existed,
restores the whole model strictly).

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed once every rank has finished, and
``latest`` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact and resumable.

Which checkpoint a resume continues from, and which ones retention deletes, is decided by
:mod:`diffgrpo.checkpoint_discovery`.

Weights and optimiser state are checked finite before a checkpoint is written (nothing is written
otherwise) and when one is loaded (before anything is restored); a failing check names the tensor.

Sharded models (FSDP): the full model and optimiser states are assembled by *every* process
(``state_dict`` is then a collective: rank 0 alone would hang, or save its own shard), rank 0
receives them and writes the same full-tensor layout; the optimiser state is then keyed by
parameter name instead of position, and loading hands the full state back to every process to
shard again. A model counts as sharded when any of its modules is a torch FSDP module
(``fully_shard`` or ``FullyShardedDataParallel``), however it was wrapped; the tests run FSDP2
(``fully_shard``) on 2 CPU ranks with gloo. accelerate's own FSDP mode cannot be tested on CPU:
with accelerate 1.15, ``accelerate launch --use_fsdp`` on a machine without a GPU stops in
``FullyShardedDataParallelPlugin.__post_init__`` ("RuntimeError: There are currently no available
devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', 'MUSA', or 'HPU'"), and a plugin passed
to ``Accelerator(cpu=True)`` is ignored (the model is wrapped in DDP). FSDP1 on CPU fails inside
torch 2.13's full ``get_model_state_dict`` ("setStorage: ... out of bounds for storage of size 0"),
so the FSDP1 path (torch's same ``state_dict`` API) is only exercised on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffgrpo.checkpoint_discovery import (
    FORMAT,
    CheckpointError,
    checkpoint_dir,
    read_header,
    retain,
    with_previous,
)
from diffgrpo.checkpoint_discovery import latest_checkpoint as latest_checkpoint  # callers' import path


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state_dict into tensors (safetensors) and JSON-able rest."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any], *, by_name: bool) -> dict[str, Any]:
    """Inverse of ``_flatten_optimizer``; parameters are keyed by name (may hold dots) or by position."""
    key_of = str if by_name else int
    state: dict[int | str, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name[len("optimizer."):].rsplit(".", 1)
        state.setdefault(key_of(param_id), {})[key] = value
    for param_id, extra in meta["scalars"].items():
        state.setdefault(key_of(param_id), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are sharded across processes (a torch FSDP1 or FSDP2 module inside)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _full_states(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimiser state_dicts; every process must call this (a collective under FSDP).

    Unsharded: ``accelerator.get_state_dict`` (the unwrapped model's own) and the optimiser's
    position-keyed state, the same on every process. Sharded: torch's full-state API gathers the
    shards into rank 0's CPU memory (other ranks get empty dicts); the optimiser is keyed by name.
    """
    if not is_sharded(model):
        return accelerator.get_state_dict(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, raw_optimizer, options=options))


def git_revision() -> str:
    """The current git commit (with '+dirty' for local changes), or 'unknown' outside a repo."""
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class Checkpoint:
    """What :func:`load_checkpoint` returns; model/optimiser/scheduler are restored in place."""

    step: int
    path: Path
    rank_tensors: dict[str, Tensor]
    """This process's tensors (RNG states) as saved, by name."""
    rank_meta: dict[str, Any]
    """This process's JSON state (data position...) as saved."""
    shared_tensors: dict[str, Tensor]
    """Task tensors saved with ``shared_tensors=`` (e.g. a reward model), by name."""
    meta: dict[str, Any]
    """Shared JSON metadata: config, git revision, task metadata."""
    run_id: str = ""
    """The ``run_id`` it was saved with ("" for checkpoints written before run ids)."""


def _nonfinite(tensors: dict[str, Tensor], names: dict[int, str]) -> str:
    """The floating-point tensors holding a NaN or an infinity, with how many, spelled for a user ("" when
    none); ``names`` maps optimiser positions to parameter names (:func:`_optimizer_tensor_names`)."""
    bad = []
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            if key.startswith("optimizer."):
                param, state = key[len("optimizer."):].rsplit(".", 1)
                key = f"optimiser state {state} of {names.get(int(param), param) if param.isdigit() else param}"
            else:
                key = "weight " + key[len("model."):]
            bad.append(f"{key} ({count} of {value.numel()} values)")
    return ", ".join(bad)


def _optimizer_tensor_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Parameter name by position in the optimiser's state_dict (positions run over its param groups in order)."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = [p for group in getattr(optimizer, "optimizer", optimizer).param_groups for p in group["params"]]
    return {i: names.get(id(p), f"parameter {i}") for i, p in enumerate(params)}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any | None = None,
    rank_tensors: dict[str, Tensor] | None = None,
    rank_meta: dict[str, Any] | None = None,
    shared_tensors: dict[str, Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    keep_last: int = 2,
    trainable_only: bool = False,
    run_id: str = "",
) -> Path:
    """Write checkpoint ``step`` atomically. Every process must call this (it synchronises, and
    under FSDP every process takes part in gathering the model and optimiser states).

    ``rank_tensors``/``rank_meta`` hold per-process state (generator states from
    ``generator.get_state()``, data position); ``shared_tensors``/``meta`` hold state that is
    identical on all processes (a learned reward model, the config). ``trainable_only`` saves only
    the model's parameters that require gradients (LoRA adapters), see the module docstring.
    ``keep_last`` (0: keep all) bounds the checkpoints of run ``run_id`` that retention keeps.

    Raises :class:`CheckpointError` on every process, before anything is written, when a weight or an
    optimiser tensor holds a NaN or an infinity.
    """
    root = checkpoint_dir(output_dir)
    name = f"step_{step:06d}"
    tmp_dir, final_dir = root / (name + ".tmp"), root / name
    rank_payload = {"torch_rng": torch.get_rng_state(), **(rank_tensors or {})}
    sharded = is_sharded(model)
    model_state, optimizer_state = _full_states(accelerator, model, optimizer)  # on every rank
    if trainable_only:
        trainable = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    tensors, opt_meta, bad = {}, {}, ""
    if accelerator.is_main_process:  # sharded: only the main process holds the full states
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model_state.items()}
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
        bad = _nonfinite(tensors, _optimizer_tensor_names(accelerator.unwrap_model(model), optimizer))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        bad = broadcast_object_list([bad])[0]
    if bad:
        raise CheckpointError(f"not writing checkpoint {final_dir}: non-finite "
                              f"{bad}; {root / 'latest'} still names the previous checkpoint")
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()

    save_file({k: v.detach().contiguous().cpu() for k, v in rank_payload.items()},
              str(tmp_dir / f"rank_{accelerator.process_index}.safetensors"),
              metadata={"format": FORMAT, "rank_meta": json.dumps(rank_meta or {})})
    if accelerator.is_main_process:
        tensors.update({f"task.{k}": v.detach().contiguous().cpu() for k, v in (shared_tensors or {}).items()})
        metadata = {
            "format": FORMAT,
            "step": str(step),
            "run_id": run_id,
            "optimizer": json.dumps(opt_meta),
            "lr_scheduler": json.dumps(lr_scheduler.state_dict() if lr_scheduler is not None else None),
            "num_processes": str(accelerator.num_processes),
            "optimizer_keys": "name" if sharded else "position",
            "model_state": "trainable" if trainable_only else "full",
            "meta": json.dumps({"git_revision": git_revision(), **(meta or {})}, default=str),
        }
        save_file(tensors, str(tmp_dir / "shared.safetensors"), metadata=metadata)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        _atomic_write_text(root / "latest", name)
        retain(root, step, keep_last, run_id)
    accelerator.wait_for_everyone()
    return final_dir


def _read_tensors(file: Path, checkpoint: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of one checkpoint file; :class:`CheckpointError` naming the file and
    the previous intact checkpoint when it cannot be read."""
    meta, problem = read_header(file)
    if problem is None:
        try:
            return load_file(str(file)), meta
        except Exception as error:  # SafetensorError, OSError: the data section is unreadable
            problem = f"{file} is damaged (safetensors: {error})"
    raise CheckpointError(with_previous(problem, checkpoint))


def load_checkpoint(
    accelerator,
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
) -> Checkpoint:
    """Restore model/optimiser/LR schedule in place and return the rest of the saved state.

    Every process calls this; a sharded (FSDP) model loads the full state on every process. Every file is
    read and checked before anything is restored: :class:`CheckpointError` (naming the file, or the
    non-finite tensors, and the previous intact checkpoint) leaves the model and optimiser untouched.
    """
    path = Path(path)
    shared_file = path / "shared.safetensors"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist: pass a checkpoint directory such as "
                                f"'<output_dir>/checkpoints/step_000010', or use --resume with the run's output dir")
    tensors, metadata = _read_tensors(shared_file, path)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{shared_file} is not a diffgrpo checkpoint (format={metadata.get('format')!r})")
    saved_procs = int(metadata["num_processes"])
    if saved_procs != accelerator.num_processes:
        raise ValueError(f"checkpoint was written by {saved_procs} processes but this run has "
                         f"{accelerator.num_processes}; resume with --num_processes {saved_procs} for an exact "
                         "continuation")
    by_name = metadata.get("optimizer_keys", "position") == "name"
    sharded = is_sharded(model)
    if sharded and optimizer is not None and not by_name:
        raise ValueError(f"{shared_file} was written by an unsharded run (optimiser state keyed by position) and "
                         "cannot be loaded into an FSDP-sharded model; resume it without FSDP (e.g. plain "
                         "`accelerate launch --multi_gpu`)")
    names = _optimizer_tensor_names(accelerator.unwrap_model(model), optimizer) if optimizer is not None else {}
    if bad := _nonfinite({k: v for k, v in tensors.items() if k.startswith(("model.", "optimizer."))}, names):
        raise CheckpointError(with_previous(f"{shared_file} holds non-finite {bad}", path))
    rank_tensors, rank_file_meta = _read_tensors(path / f"rank_{accelerator.process_index}.safetensors", path)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    partial = metadata.get("model_state", "full") == "trainable"
    if partial:
        _check_trainable_state(accelerator.unwrap_model(model), model_state, shared_file)
    opt_state = None
    if optimizer is not None:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        opt_state = _unflatten_optimizer(opt_tensors, json.loads(metadata["optimizer"]), by_name=by_name)
    if sharded or by_name:  # every process hands the full state to torch, which keeps its own shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=not partial)
        set_model_state_dict(model, model_state, options=options)
        if opt_state is not None:
            set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), opt_state, options=options)
    else:
        accelerator.unwrap_model(model).load_state_dict(model_state, strict=not partial)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
    lr_state = json.loads(metadata["lr_scheduler"])
    if lr_scheduler is not None and lr_state is not None:
        lr_scheduler.load_state_dict(lr_state)
    torch.set_rng_state(rank_tensors.pop("torch_rng"))
    return Checkpoint(
        step=int(metadata["step"]),
        path=path,
        rank_tensors=rank_tensors,
        rank_meta=json.loads(rank_file_meta.get("rank_meta", "{}")),
        shared_tensors={k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")},
        meta=json.loads(metadata["meta"]),
        run_id=metadata.get("run_id", ""),
    )


def read_shared_state(path: str | Path, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The shared task tensors whose names start with ``prefix`` and the JSON metadata of checkpoint ``path``,
    read without restoring anything (no model, optimiser or RNG state is touched).

    Why: a recipe exports state a finished run leaves in its last checkpoint (e.g. the EMA weights)."""
    from safetensors import safe_open

    shared_file = Path(path) / "shared.safetensors"
    with safe_open(str(shared_file), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{shared_file} is not a diffgrpo checkpoint (format={metadata.get('format')!r})")
        start = "task." + prefix
        tensors = {k[len("task."):]: f.get_tensor(k) for k in f.keys() if k.startswith(start)}
    return tensors, json.loads(metadata["meta"])


def _check_trainable_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Raise unless ``state`` holds exactly the model's trainable parameters, with their shapes (a
    ``trainable_only`` checkpoint); a different LoRA rank or target list is the usual cause."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    reshaped = [] if is_sharded(model) else sorted(  # sharded parameters hold a shard, not the full shape
        f"{name}: {tuple(state[name].shape)} saved, {tuple(p.shape)} now"
        for name, p in params.items() if name in state and state[name].shape != p.shape)
    if missing or unexpected or reshaped:
        raise ValueError(f"{path} holds the trainable parameters of another model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, other shapes {reshaped[:3]}, of {len(params)} trainable): "
                         "add the same LoRA adapters to the same base model before loading; the LoRA settings "
                         "(--lora.r, --lora.target-modules) must match the checkpoint's")
