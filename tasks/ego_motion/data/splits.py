"""The ego-motion splits: which AMASS-layout files are "train", "prior_train", "post_train", "validation"
and "test".

All clip-disjoint: "test" (held out), "train" (everything else), and "train" cut in three for
post-training: "post_train" (clips the prior never sees; GRPO post-trains on them), "validation" (clips
neither the prior nor GRPO trains on, drawn from the post-training clips: the probe that selects a GRPO
checkpoint and its defaults reads them, never the test clips) and "prior_train" (train minus both; the
prior trains on it). The bundled CMU clips use ``assets/split.json``; a
directory of AMASS files can instead use EgoAllo's rule (test = top-level folders ``Transitions_mocap``
and ``SSM_synced``). Extra folders may add clips to "prior_train" or "post_train" only
(``DataSource.extra_prior_train_dir`` / ``extra_post_train_dir``). The whole account is in the module
docstring of ``tasks.ego_motion.data.windows``, which builds the windows of a split.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

EGOALLO_TEST_SUBSETS: tuple[str, ...] = ("Transitions_mocap", "SSM_synced")
AMASS_SHAPE_FILE = "shape.npz"
BUNDLED_CMU_DIR = Path(__file__).resolve().parents[1] / "assets" / "cmu"
BUNDLED_SPLIT_FILE = BUNDLED_CMU_DIR.parent / "split.json"
Split = Literal["train", "prior_train", "post_train", "validation", "test"]
SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train", "validation", "test")
TRAINING_SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train")
"""Splits that get the training stride and mirrored copies ("validation" is windowed like "test": it
measures, so it gets the test stride and no mirrored copies)."""


@dataclass(frozen=True)
class DataSource:
    """Where the AMASS-layout files are and how they split into train and test."""

    root: Path = BUNDLED_CMU_DIR
    """Directory searched recursively for ``*.npz``."""
    split_rule: Literal["split_json", "egoallo"] = "split_json"
    """'split_json': clip names listed in ``split_file``; 'egoallo': test = top folders
    Transitions_mocap and SSM_synced under root, train = the rest."""
    split_file: Path | None = BUNDLED_SPLIT_FILE
    """JSON with "train" and "test" lists of file stems, and optionally "post_train" and "validation"
    (disjoint subsets of "train"); read only with split_rule='split_json'."""
    post_train_fraction: float = 0.1
    """split_rule='egoallo' only: share of the train files held out of the prior for post-training, as
    post_train and validation (by a SHA-256 of the file's path relative to root, so the choice is fixed
    and clip-disjoint)."""
    validation_fraction: float = 0.2
    """split_rule='egoallo' only: share of those post-training files that form validation instead of
    post_train (the same hash: files whose share lies below post_train_fraction x validation_fraction)."""
    extra_prior_train_dir: Path | None = None
    """A folder of AMASS-layout ``*.npz`` clips (searched recursively) added to the 'prior_train' split
    only, e.g. the converted ReActIdle idle clips; 'train', 'post_train' and 'test' never see them.
    Their sequence names start with ``extra_prior_train/``."""
    extra_post_train_dir: Path | None = None
    """The same for the 'post_train' split (names start with ``extra_post_train/``), e.g. the ReActIdle
    clips. They are full body clips (the head trajectory is computed from the body, as for every clip);
    ``EgoMotionTaskConfig.post_train_heads_only`` then serves only their heads, for ground-truth-free
    post-training."""

    def __post_init__(self) -> None:
        if not 0.0 < self.post_train_fraction < 1.0:
            raise ValueError(f"post_train_fraction={self.post_train_fraction} must be in (0, 1).")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in (0, 1).")

    def extra_dir(self, split: str) -> Path | None:
        """The extra folder added to ``split`` (None for 'train', 'test' and splits without one)."""
        return {"prior_train": self.extra_prior_train_dir, "post_train": self.extra_post_train_dir}.get(split)

    def files(self, split: Split) -> list[Path]:
        """Sorted source files of one split; raises if there are none."""
        root = Path(self.root).expanduser()
        if not root.is_dir():
            hint = " (build the bundled clips with `python -m tasks.ego_motion.data.convert`)" \
                if root == BUNDLED_CMU_DIR else ""
            raise FileNotFoundError(f"AMASS source directory {root} does not exist{hint}; pass "
                                    f"DataSource(root=...) pointing at a folder of AMASS .npz files.")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        # AMASS keeps each subject's betas in a motion-less shape.npz beside the motions: not a sequence.
        all_files = sorted(p for p in root.rglob("*.npz") if p.is_file() and p.name != AMASS_SHAPE_FILE)
        if self.split_rule == "split_json":
            chosen = self._files_from_split_file(root, all_files, split)
        elif self.split_rule == "egoallo":
            is_test = [p.relative_to(root).parts[0] in EGOALLO_TEST_SUBSETS for p in all_files]
            chosen = [p for p, t in zip(all_files, is_test, strict=True) if t == (split == "test")]
            if split in ("prior_train", "post_train", "validation"):
                chosen = [p for p in chosen if self._hash_split(p.relative_to(root)) == split]
        else:
            raise ValueError(f"split_rule must be 'split_json' or 'egoallo', got {self.split_rule!r}.")
        if not chosen:
            raise FileNotFoundError(f"no .npz files for split '{split}' under {root} (split_rule="
                                    f"{self.split_rule!r}); check the directory and the split rule.")
        if self.extra_dir(split) is not None:
            extra_root = Path(self.extra_dir(split)).expanduser()
            if root.resolve().is_relative_to(extra_root.resolve()) or \
                    extra_root.resolve().is_relative_to(root.resolve()):
                raise ValueError(f"extra_{split}_dir {extra_root} and the source root {root} overlap, so "
                                 "its clips would also land in the other splits; keep the folders apart.")
            chosen = chosen + extra_split_files(extra_root, split)
        return chosen

    def _hash_split(self, relative: Path) -> str:
        """'validation', 'post_train' or 'prior_train' for a train file under split_rule='egoallo'."""
        share = self._hash_share(relative)
        if share < self.post_train_fraction * self.validation_fraction:
            return "validation"
        return "post_train" if share < self.post_train_fraction else "prior_train"

    @staticmethod
    def _hash_share(relative: Path) -> float:
        """A fixed number in [0, 1) per relative path (first 8 bytes of its SHA-256)."""
        digest = hashlib.sha256(relative.as_posix().encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2.0**64

    def _files_from_split_file(self, root: Path, all_files: list[Path], split: Split) -> list[Path]:
        split_path = Path(self.split_file).expanduser() if self.split_file is not None else None
        if split_path is None or not split_path.exists():
            raise FileNotFoundError(f"split file {split_path} not found; pass DataSource(split_file=...) "
                                    f'with {{"train": [...], "test": [...]}} or split_rule="egoallo".')
        lists = json.loads(split_path.read_text())
        stems = {name: {Path(n).stem for n in lists[name]} for name in ("train", "post_train", "validation", "test")
                 if name in lists}
        for name in ("post_train", "validation"):
            if name in stems and not stems[name] <= stems["train"]:
                raise ValueError(f"{split_path}: every {name!r} clip must also be listed under 'train'.")
        if both := stems.get("post_train", set()) & stems.get("validation", set()):
            raise ValueError(f"{split_path}: clips {sorted(both)} are listed under "
                             "both 'post_train' and 'validation'; a clip GRPO trains on cannot validate it.")
        if split in ("train", "test"):
            wanted = stems[split]
        elif (needed := "post_train" if split == "prior_train" else split) not in stems:
            raise ValueError(f"{split_path} has no {needed!r} list, so split {split!r} is undefined; add "
                             '"post_train" and "validation": [clip names, disjoint subsets of "train"] or use split '
                             '"train".')
        elif split == "prior_train":
            wanted = stems["train"] - stems["post_train"] - stems.get("validation", set())
        else:
            wanted = stems[split]
        chosen = [p for p in all_files if p.stem in wanted]
        missing = wanted - {p.stem for p in chosen}
        if missing:
            raise FileNotFoundError(f"{split_path} lists {sorted(missing)} for '{split}' but no such .npz is "
                                    f"under {root}; regenerate the clips or fix the split file.")
        return chosen


def extra_split_files(directory: Path, split: str) -> list[Path]:
    """Sorted ``*.npz`` motion files under ``directory`` (recursive, ``shape.npz`` left out), the extra
    clips of ``split``.

    Raises FileNotFoundError, naming the fix, if the folder is missing or holds none.
    """
    directory = Path(directory).expanduser()
    flag = {"prior_train": "--extra-prior-train-dir", "post_train": "--task.extra-post-train-dir"}.get(split, "")
    hint = ("build the ReActIdle clips with `python -m tasks.ego_motion.data.convert --reactidle --output-dir DIR` "
            f"or pass another folder of AMASS .npz files ({flag})")
    if not directory.is_dir():
        raise FileNotFoundError(f"extra {split.replace('_', '-')} directory {directory} does not exist; {hint}.")
    files = sorted(p for p in directory.rglob("*.npz") if p.is_file() and p.name != AMASS_SHAPE_FILE)
    if not files:
        raise FileNotFoundError(f"extra {split.replace('_', '-')} directory {directory} holds no .npz files; {hint}.")
    return files


def _source_key(path: Path, root: Path, extra_root: Path | None, split: str = "prior_train") -> str:
    """Path of a source file below root, or ``extra_<split>/<path below extra_root>``."""
    if extra_root is not None and path.is_relative_to(extra_root):
        return f"extra_{split}/{path.relative_to(extra_root).as_posix()}"
    return path.relative_to(root).as_posix()
