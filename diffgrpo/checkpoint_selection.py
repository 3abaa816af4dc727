"""The selected checkpoint: the weights whose probe value of ``GRPOConfig.selection.metric`` is the best so far.

Why a folder of its own beside ``checkpoints/``: retention deletes old resume checkpoints, and the selected
one may be far older than the last; it is what a run reports beside its last weights. ``<output_dir>/best/``
holds ``model.safetensors`` (the probed weights: the EMA's when ``ema.use_for_eval``) and ``selection.json``
(iteration, metric, mode, value, run id).

Where the best-so-far lives: in the run's history (``probe/iteration`` and ``probe/<metric>``), which every
checkpoint carries, so a resume knows it without a second record (:func:`best_in_history`). The folder is
written after the checkpoint of the same iteration (``GRPOConfig`` requires a checkpoint at every probed
iteration), so a crash between the two leaves a checkpoint whose own weights are the selected ones:
:func:`needs_repair` tells the resumed run to rewrite the folder from them.

Atomic: the folder is written as ``best.tmp/``, the previous one moved to ``best.old/``, the new one renamed
to ``best/``, then ``best.old/`` removed; a crash between the two renames leaves ``best.old/``, which
:func:`selected_dir` reads instead.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from diffgrpo.config import SelectionConfig

SELECTED_FOLDER = "best"
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "selection.json"


@dataclass(frozen=True)
class Selected:
    """The best probe evaluation so far."""

    iteration: int
    """Iterations done when it was probed (0: the starting weights)."""
    value: float
    """The probe's mean of ``metric`` over its C x M samples."""
    metric: str
    mode: str
    """'min' or 'max' (``SelectionConfig.mode``)."""


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Strictly better in the direction of ``mode`` (ties keep the earlier checkpoint); NaN never is."""
    if math.isnan(value):
        return False
    return best is None or (value < best if mode == "min" else value > best)


def best_in_history(history: Mapping[str, list[float]], cfg: SelectionConfig) -> Selected | None:
    """The best probe evaluation recorded in a run's history (None before the first probe).

    Raises KeyError naming the probe's keys when ``cfg.metric`` is not one of them."""
    key = f"probe/{cfg.metric}"
    iterations = history.get("probe/iteration", [])
    if not iterations:
        return None
    if key not in history:
        known = sorted(k.removeprefix("probe/") for k in history if k.startswith("probe/") and "/ci_" not in k
                       and k != "probe/iteration")
        raise KeyError(f"--grpo.selection.metric {cfg.metric!r} is not a probe quantity; the probe reports "
                       f"{', '.join(known)}")
    best: Selected | None = None
    for iteration, value in zip(iterations, history[key], strict=True):
        if is_better(value, None if best is None else best.value, cfg.mode):
            best = Selected(iteration=int(iteration), value=float(value), metric=cfg.metric, mode=cfg.mode)
    return best


def selected_dir(output_dir: str | Path) -> Path | None:
    """The folder of the selected checkpoint (``best/``, or ``best.old/`` after a crash mid-swap); None if none."""
    root = Path(output_dir)
    for name in (SELECTED_FOLDER, SELECTED_FOLDER + ".old"):
        if (root / name / RECORD_FILE).is_file():
            return root / name
    return None


def read_selected(output_dir: str | Path) -> tuple[Selected, dict] | None:
    """The selected checkpoint's record and its extra fields (e.g. the run id), or None."""
    folder = selected_dir(output_dir)
    if folder is None:
        return None
    record = json.loads((folder / RECORD_FILE).read_text())
    fields = {k: record.pop(k) for k in ("iteration", "value", "metric", "mode")}
    return Selected(**fields), record


def save_selected(model: nn.Module, output_dir: str | Path, selected: Selected, run_id: str = "") -> Path:
    """Write ``model``'s weights and ``selected`` as ``<output_dir>/best/`` atomically; returns that folder.

    Call on the main process only; the weights are all of ``model``'s parameters and buffers."""
    root = Path(output_dir)
    final, temporary, previous = (root / SELECTED_FOLDER, root / (SELECTED_FOLDER + ".tmp"),
                                  root / (SELECTED_FOLDER + ".old"))
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_model(model, str(temporary / WEIGHTS_FILE))
    (temporary / RECORD_FILE).write_text(json.dumps({**asdict(selected), "run_id": run_id}, indent=2))
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    temporary.rename(final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def load_selected(model: nn.Module, output_dir: str | Path) -> Selected:
    """Load the selected weights into ``model`` (strict: every parameter and buffer) and return their record.

    Raises FileNotFoundError when ``output_dir`` holds no selected checkpoint (the run had no
    ``--grpo.selection.metric``)."""
    found = read_selected(output_dir)
    if found is None:
        raise FileNotFoundError(f"{output_dir} holds no selected checkpoint ({SELECTED_FOLDER}/{RECORD_FILE}); "
                                "the run was trained without --grpo.selection.metric")
    load_model(model, str(selected_dir(output_dir) / WEIGHTS_FILE), strict=True)
    return found[0]


def needs_repair(output_dir: str | Path, best: Selected | None, resumed_step: int, run_id: str) -> bool:
    """Whether a resumed run must rewrite ``best/`` from the checkpoint it resumed from: the history's best is
    that checkpoint's own iteration but the folder holds another (a crash fell between the checkpoint and
    the folder). A folder of a later iteration than the checkpoint is left: the resumed run reaches it again."""
    if best is None or best.iteration != resumed_step:
        return False
    found = read_selected(output_dir)
    return found is None or found[1].get("run_id") != run_id or found[0].iteration != best.iteration
