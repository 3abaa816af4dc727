"""The ego-motion splits: which AMASS-layout files are "train", "prior_train", "post_train" and "test".

All clip-disjoint: "test" (held out), "train" (everything else), and "train" cut in two for
post-training: "post_train" (clips the prior never sees; GRPO post-trains on them) and "prior_train"
(train minus post_train; the prior trains on it). The bundled CMU clips use ``assets/split.json``; a
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
Split = Literal["train", "prior_train", "post_train", "test"]
SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train", "test")
TRAINING_SPLITS: tuple[str, ...] = ("train", "prior_train", "post_train")
"""Splits that get the training stride and mirrored copies."""


@dataclass(frozen=True)
class DataSource:
    """Where the AMASS-layout files are and how they split into train and test."""

    root: Path = BUNDLED_CMU_DIR
    """Directory searched recursively for ``*.npz``."""
    split_rule: Literal["split_json", "egoallo"] = "split_json"
    """'split_json': clip names listed in ``split_file``; 'egoallo': test = top folders
    Transitions_mocap and SSM_synced under root, train = the rest."""
    split_file: Path | None = BUNDLED_SPLIT_FILE
    """JSON with "train" and "test" lists of file stems, and optionally "post_train" (a subset of "train");
    read only with split_rule='split_json'."""
    post_train_fraction: float = 0.1
    """split_rule='egoallo' only: share of the train files that form post_train (by a SHA-256 of the
    file's path relative to root, so the choice is fixed and clip-disjoint)."""
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
            if split in ("prior_train", "post_train"):
                post = [self._hash_share(p.relative_to(root)) < self.post_train_fraction for p in chosen]
                chosen = [p for p, is_post in zip(chosen, post, strict=True) if is_post == (split == "post_train")]
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
        if "post_train" in lists and not {Path(n).stem for n in lists["post_train"]} <= {
                Path(n).stem for n in lists["train"]}:
            raise ValueError(f"{split_path}: every 'post_train' clip must also be listed under 'train'.")
        if split in ("train", "test"):
            wanted = {Path(n).stem for n in lists[split]}
        elif "post_train" not in lists:
            raise ValueError(f"{split_path} has no 'post_train' list, so split {split!r} is undefined; add "
                             '"post_train": [clip names, a subset of "train"] or use split "train".')
        else:
            post = {Path(n).stem for n in lists["post_train"]}
            wanted = post if split == "post_train" else {Path(n).stem for n in lists["train"]} - post
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
