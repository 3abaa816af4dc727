"""Accelerator set-up shared by the recipes.

Why: ``accelerate`` only runs several processes on a machine without GPUs when the processes
are started by torchrun (``accelerate launch --multi_gpu --num_processes N``) *and* the
Accelerator is told to use the CPU; otherwise it silently runs a single rank. This helper makes
that choice and logs the rank layout so a user can see how many processes really run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from diffgrpo.precision import resolve_mixed_precision

logger = logging.getLogger(__name__)


def make_accelerator(output_dir: str | Path, *, mixed_precision: str = "no", log_with: str | None = "tensorboard",
                     cpu: bool | None = None) -> Accelerator:
    """An Accelerator logging to ``output_dir/logs``; CPU multi-process (gloo) when no GPU is present.

    ``mixed_precision`` "auto" becomes bf16 where it pays and "no" elsewhere
    (:func:`diffgrpo.precision.resolve_mixed_precision`)."""
    use_cpu = not torch.cuda.is_available() if cpu is None else cpu
    mixed_precision = resolve_mixed_precision(mixed_precision, "cpu" if use_cpu else "cuda")
    if use_cpu and mixed_precision == "fp16":
        raise ValueError("fp16 mixed precision needs a GPU; on CPU use --mixed-precision bf16 or no")
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
    )
    logger.info("process %d of %d (%s, device %s)", accelerator.process_index, accelerator.num_processes,
                accelerator.distributed_type, accelerator.device)
    return accelerator
