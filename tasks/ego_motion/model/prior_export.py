"""The post-trained prior as a file that ``--prior`` reads: what the MotionGRPO job leaves for users.

Every recipe that takes ``--prior`` (the main job, evaluation, inference, RLPF) loads it with
:func:`~tasks.ego_motion.model.network.load_denoiser`, so the export writes exactly what that reads back:

- a :class:`~tasks.ego_motion.model.network.MotionDenoiser` as ``prior.safetensors``
  (:func:`~tasks.ego_motion.model.network.save_denoiser`: the config travels in the file's metadata);
- an :class:`~tasks.ego_motion.model.egoallo_checkpoint.EgoAlloDenoiser` (EgoAllo's released prior, post-trained)
  as EgoAllo's own folder layout, ``prior/model_config.yaml`` (the source's YAML, copied byte for byte) +
  ``prior/checkpoints_<N>/model.safetensors`` (docs/egoallo_checkpoint.md), N the GRPO iterations run.

Both are written under a temporary name and then renamed (``os.replace``), so a killed run never leaves a
half-written prior under the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from tasks.ego_motion.model.egoallo_checkpoint import EgoAlloDenoiser
from tasks.ego_motion.model.egoallo_folder import CONFIG_FILE, WEIGHTS_FILE, find_checkpoint_files
from tasks.ego_motion.model.network import MotionDenoiser, save_denoiser

DENOISER_FILE = "prior.safetensors"
"""The exported MotionDenoiser, in the job's output directory."""
EGOALLO_FOLDER = "prior"
"""The exported EgoAllo-architecture prior (a folder in EgoAllo's layout), in the job's output directory."""


def export_prior(model: nn.Module, output_dir: str | Path, source: str | Path, step: int) -> Path:
    """Write ``model`` where ``--prior`` reads it and return that path (a file or a folder, see the module).

    ``source``: the ``--prior`` the model was loaded from (an EgoAllo export copies its model_config.yaml);
    ``step``: the GRPO iterations run (names EgoAllo's ``checkpoints_<N>`` folder).

    Raises:
        TypeError: ``model`` is neither a MotionDenoiser nor an EgoAlloDenoiser (no loader would read it back).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, MotionDenoiser):
        path = output_dir / DENOISER_FILE
        temporary = path.with_name(path.name + ".tmp")
        save_denoiser(temporary, model)
        os.replace(temporary, path)
        return path
    if isinstance(model, EgoAlloDenoiser):
        return _export_egoallo(model, output_dir / EGOALLO_FOLDER, Path(source), step)
    raise TypeError(f"cannot export a {type(model).__name__}: load_denoiser reads back only MotionDenoiser files and "
                    "EgoAllo's checkpoint folders; pass a prior of one of those architectures.")


def _export_egoallo(model: EgoAlloDenoiser, folder: Path, source: Path, step: int) -> Path:
    """EgoAllo's layout in a temporary folder, then renamed over ``folder`` (a previous export moved aside first)."""
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    weights_dir = temporary / f"checkpoints_{step}"
    weights_dir.mkdir(parents=True)
    shutil.copyfile(find_checkpoint_files(source).config_path, temporary / CONFIG_FILE)
    save_file({name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()},
              str(weights_dir / WEIGHTS_FILE))
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():  # os.replace cannot rename a folder over a non-empty one
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)
    return folder
