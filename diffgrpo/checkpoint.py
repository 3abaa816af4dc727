"""Atomic safetensors checkpoints that hold everything an exact resume needs.

Why not ``accelerator.save_state``: it pickles the optimiser and RNG states. Here every tensor
(model, optimiser moments, RNG states, task state such as a learned reward model) goes into
safetensors and every non-tensor (step, LR schedule, optimiser hyper-parameters, data position,
config, git revision) into its JSON metadata. Nothing is unpickled on load.

Layout of ``<output_dir>/checkpoints/``::

    step_000010/shared.safetensors   model + optimiser + shared task state (main process)
    step_000010/rank_0.safetensors   this process's RNG streams and data position (every rank)
    latest                           name of the newest complete checkpoint

A checkpoint is written into ``step_XXXXXX.tmp`` and renamed once every rank has finished, and
``latest`` is replaced atomically afterwards, so a crash at any moment leaves the previous
checkpoint intact and resumable.
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

_FORMAT = "diffgrpo-checkpoint-v1"


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


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, extra in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


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


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None when there is none."""
    root = checkpoint_dir(output_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "shared.safetensors").exists() else None


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
) -> Path:
    """Write checkpoint ``step`` atomically. Every process must call this (it synchronises).

    ``rank_tensors``/``rank_meta`` hold per-process state (generator states from
    ``generator.get_state()``, data position); ``shared_tensors``/``meta`` hold state that is
    identical on all processes (a learned reward model, the config).
    """
    root = checkpoint_dir(output_dir)
    name = f"step_{step:06d}"
    tmp_dir, final_dir = root / (name + ".tmp"), root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()

    rank_payload = {"torch_rng": torch.get_rng_state(), **(rank_tensors or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in rank_payload.items()},
              str(tmp_dir / f"rank_{accelerator.process_index}.safetensors"),
              metadata={"format": _FORMAT, "rank_meta": json.dumps(rank_meta or {})})

    if accelerator.is_main_process:
        model_state = accelerator.unwrap_model(model).state_dict()
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model_state.items()}
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors.update({f"task.{k}": v.detach().contiguous().cpu() for k, v in (shared_tensors or {}).items()})
        metadata = {
            "format": _FORMAT,
            "step": str(step),
            "optimizer": json.dumps(opt_meta),
            "lr_scheduler": json.dumps(lr_scheduler.state_dict() if lr_scheduler is not None else None),
            "num_processes": str(accelerator.num_processes),
            "meta": json.dumps({"git_revision": git_revision(), **(meta or {})}, default=str),
        }
        save_file(tensors, str(tmp_dir / "shared.safetensors"), metadata=metadata)
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp_dir, final_dir)
        _atomic_write_text(root / "latest", name)
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final_dir


def load_checkpoint(
    accelerator,
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any | None = None,
) -> Checkpoint:
    """Restore model/optimiser/LR schedule in place and return the rest of the saved state."""
    path = Path(path)
    shared_file = path / "shared.safetensors"
    if not shared_file.exists():
        raise FileNotFoundError(f"{shared_file} does not exist: pass a checkpoint directory such as "
                                f"'<output_dir>/checkpoints/step_000010', or use --resume with the run's output dir")
    from safetensors import safe_open

    with safe_open(str(shared_file), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{shared_file} is not a diffgrpo checkpoint (format={metadata.get('format')!r})")
    saved_procs = int(metadata["num_processes"])
    if saved_procs != accelerator.num_processes:
        raise ValueError(f"checkpoint was written by {saved_procs} processes but this run has "
                         f"{accelerator.num_processes}; resume with --num_processes {saved_procs} for an exact "
                         "continuation")
    tensors = load_file(str(shared_file))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    accelerator.unwrap_model(model).load_state_dict(model_state)
    if optimizer is not None:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, json.loads(metadata["optimizer"])))
    lr_state = json.loads(metadata["lr_scheduler"])
    if lr_scheduler is not None and lr_state is not None:
        lr_scheduler.load_state_dict(lr_state)

    rank_file = path / f"rank_{accelerator.process_index}.safetensors"
    rank_tensors = load_file(str(rank_file))
    with safe_open(str(rank_file), framework="pt") as f:
        rank_meta = json.loads((f.metadata() or {}).get("rank_meta", "{}"))
    torch.set_rng_state(rank_tensors.pop("torch_rng"))
    return Checkpoint(
        step=int(metadata["step"]),
        path=path,
        rank_tensors=rank_tensors,
        rank_meta=rank_meta,
        shared_tensors={k[len("task."):]: v for k, v in tensors.items() if k.startswith("task.")},
        meta=json.loads(metadata["meta"]),
    )
