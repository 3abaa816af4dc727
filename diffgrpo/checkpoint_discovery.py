r"""Which checkpoint folders a run has, which are intact, which one a resume continues from, and which
ones retention deletes.

Layout of ``<output_dir>/checkpoints/`` (written by :func:`diffgrpo.checkpoint.save_checkpoint`)::

    step_000010/shared.safetensors   model + optimiser + shared task state (main process)
    step_000010/rank_0.safetensors   one per process that wrote it
    latest                           name of the newest complete checkpoint

Finding the checkpoint to resume (:func:`latest_checkpoint`): folders count by the step number in
their name (``step_(\d+)``, so ``step_1000000`` is newer than ``step_999999``), and ``latest`` is
followed only when it holds such a plain name of a folder inside ``checkpoints/`` (never a path) and
that folder is intact: every file present and readable (:func:`checkpoint_problem`). Otherwise the
resume falls back to the newest intact checkpoint with a WARNING naming what was wrong; it stops with
:class:`CheckpointError` only when checkpoints exist and none is intact. Why fall back rather than
stop: the write protocol (:mod:`diffgrpo.checkpoint`) leaves at any crash only intact checkpoints, a
``.tmp`` leftover, or a pointer one step behind (or not yet written, for the first checkpoint); an
exact resume from an older intact checkpoint replays the same iterations bit-identically, so falling
back costs compute, never correctness; a damaged step folder is replaced when its step is written again.

Retention (``keep_last``) deletes only checkpoints of the same run (``run_id``) older than the one just
written; never the one ``latest`` names, never a newer step, never a folder whose run it cannot read.
A folder is renamed to ``step_XXXXXX.deleting`` before it is removed, so an interrupted deletion
never leaves a half-deleted folder that looks like a checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

FORMAT = "diffgrpo-checkpoint-v1"
"""The ``format`` metadata of every diffgrpo checkpoint file."""
STEP_NAME = re.compile(r"step_(\d+)")
"""A checkpoint folder's name (full match); the number is its step."""

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed: a missing or damaged file, a pointer that is not a
    step name, non-finite weights or optimiser state."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    """``<output_dir>/checkpoints``, the folder of a run's checkpoints."""
    return Path(output_dir) / "checkpoints"


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint folder named ``step_<digits>``, else None (``.tmp``, ``.deleting``, others)."""
    match = STEP_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoint_steps(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder of a run, oldest first, ordered by step number (never by name), intact or not."""
    return _step_folders(checkpoint_dir(output_dir))


def _step_folders(root: Path) -> list[Path]:
    """The ``step_<digits>`` folders in ``root`` (not links), by step number."""
    found = [(step, p) for p in root.iterdir()
             if (step := step_of(p)) is not None and p.is_dir() and not p.is_symlink()] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def read_header(file: Path) -> tuple[dict[str, str], str | None]:
    """A safetensors file's metadata, or why it cannot be read (missing, empty, truncated, not safetensors)."""
    from safetensors import safe_open

    if not file.is_file():
        return {}, f"{file} is missing"
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}, None
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError), both mean unreadable
        return {}, f"{file} is damaged ({file.stat().st_size} bytes; safetensors: {error})"


def checkpoint_problem(path: str | Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed, or None when it is intact: its shared file and one
    rank file per process that wrote it are present and readable. A header-level check (a truncated or
    empty file is found, altered values are not; :func:`diffgrpo.checkpoint.load_checkpoint` checks them)."""
    path = Path(path)
    meta, problem = read_header(path / "shared.safetensors")
    if problem is not None:
        return problem
    if meta.get("format") != FORMAT:
        return f"{path / 'shared.safetensors'} is not a diffgrpo checkpoint (format={meta.get('format')!r})"
    for rank in range(int(meta.get("num_processes", "1"))):
        if (problem := read_header(path / f"rank_{rank}.safetensors")[1]) is not None:
            return problem
    return None


def _named_by_latest(root: Path) -> tuple[Path | None, str | None]:
    """The folder ``latest`` names and None, or None and why it names none that may be followed."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None, f"{pointer} is missing"
    name = pointer.read_text().strip()
    if step_of(name) is None or name != Path(name).name:
        return None, (f"{pointer} holds {name[:200]!r}, not the name of a step folder of this run "
                      "(step_<digits>, no path): it is not followed")
    return root / name, None


def previous_intact(path: str | Path) -> Path | None:
    """The newest intact checkpoint beside ``path`` older than it, or None."""
    path = Path(path)
    step = step_of(path)
    older = [p for p in _step_folders(path.parent) if step is None or (step_of(p) or 0) < step]
    return next((p for p in reversed(older) if checkpoint_problem(p) is None), None)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a resume continues from; None when the run's folder holds no checkpoint at all.

    The folder ``latest`` names when that is a plain step name and the folder is intact, otherwise the
    newest intact checkpoint by step number, with a WARNING naming what was wrong (see the module
    docstring for why). Raises :class:`CheckpointError` when checkpoints exist but none is intact,
    naming each problem.
    """
    root = checkpoint_dir(output_dir)
    steps = checkpoint_steps(output_dir)
    named, pointer_problem = _named_by_latest(root)
    if named is not None:
        pointer_problem = (checkpoint_problem(named) if named.is_dir() and not named.is_symlink()
                           else f"{named} (named by {root / 'latest'}) is missing or not a folder of this run")
        if pointer_problem is None:
            return named
    if not steps and not (root / "latest").exists():
        return None
    problems = {p.name: checkpoint_problem(p) for p in steps}
    intact = [name for name, problem in problems.items() if problem is None]
    if not intact:
        damaged = "; ".join(problem for problem in problems.values() if problem) or "no step folder"
        raise CheckpointError(f"{root} holds no intact checkpoint to resume: {pointer_problem}; {damaged}. "
                              "Restore a checkpoint there, or start the run over in a new output directory")
    damaged = {name: problem for name, problem in problems.items() if problem is not None}
    logger.warning("%s; resuming from the newest intact checkpoint %s (intact: %s%s)", pointer_problem,
                   root / intact[-1], ", ".join(intact),
                   f"; damaged: {'; '.join(damaged.values())}" if damaged else "")
    return root / intact[-1]


def retain(root: Path, written: int, keep_last: int, run_id: str) -> None:
    """Delete run ``run_id``'s checkpoints older than step ``written`` beyond the newest ``keep_last`` (the
    written one included); newer steps, other runs' and unreadable folders are never touched."""
    for leftover in root.glob("step_*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return
    own = [p for p in _step_folders(root) if (step_of(p) or 0) < written
           and read_header(p / "shared.safetensors")[0].get("run_id", "") == run_id
           and checkpoint_problem(p) is None]
    for old in own[:max(len(own) - (keep_last - 1), 0)]:
        doomed = old.with_name(old.name + ".deleting")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def with_previous(problem: str, checkpoint: Path) -> str:
    """``problem`` (why ``checkpoint`` cannot be loaded) followed by the intact checkpoint a resume can use."""
    previous = previous_intact(checkpoint)
    if previous is None:
        return f"{problem}; there is no older intact checkpoint beside it"
    return (f"{problem}; the previous intact checkpoint is {previous}: move {checkpoint} out of "
            f"{checkpoint.parent} and --resume continues from {previous.name}")
