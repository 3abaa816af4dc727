"""Retarget CMU (and ReActIdle) BVH clips onto the SMPL-H body model and write them in the AMASS layout.

The command line over the clips: ``python -m tasks.ego_motion.data.convert`` rebuilds ``assets/cmu``
(every CMU clip under ``--mocap-root`` retargeted, the split of clips into train, post-train and
test, the notice), and ``python -m tasks.ego_motion.data.convert --reactidle`` builds
``runs/reactidle_amass`` (not committed). The steps have their own modules: the rig tables
``skeletons.py``, the retargeting ``retarget.py`` (rotation transfer, betas fit, floor, 30 fps), the
ReActIdle clips ``reactidle.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from pathlib import Path

import torch

from ..body.body_model import load_body_model
from .amass import TARGET_FPS, save_amass_npz
from .reactidle import REACTIDLE_DEFAULT_OUT, convert_reactidle
from .retarget import DEFAULT_MOCAP_ROOT, convert_bvh

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def clip_id(path: Path) -> str:
    """'001_01' for cmu_iclone clips; original-skeleton clips get '_orig' ('001_01_orig', '131_02_orig'),
    since CMU trial 1_1 exists on both rigs."""
    subject, trial = path.stem.split("_")
    suffix = "_orig" if path.parent.name == "cmu_original" else ""
    return f"{int(subject):03d}_{int(trial):02d}{suffix}"


# Held-out clips: at least one per subject and per activity group (walks, climbs, swordplay,
# uneven terrain, dance figures, basketball dribbles, the 131 walks). The same CMU trial on both
# rigs (001_01 / 001_01_orig) stays on one side.
TEST_CLIPS: tuple[str, ...] = (
    "001_14",
    "002_02",
    "002_08",
    "003_02",
    "005_01",
    "005_10",
    "005_19",
    "006_01",
    "006_05",
    "006_09",
    "007_02",
    "007_12",
    "131_02_orig",
)


def describe_clips(mocap_root: Path, clip_ids: list[str]) -> dict[str, str]:
    """Clip id -> CMU motion description from cmu_iclone/CMU_data.csv."""
    table: dict[tuple[int, int], str] = {}
    with open(mocap_root / "cmu_iclone" / "CMU_data.csv", newline="") as f:
        for row in csv.DictReader(f):
            table[(int(row["Subject"]), int(row["Trial #"]))] = row["Motion Description"].strip()
    out = {}
    for c in clip_ids:
        subject, trial = c.split("_")[:2]
        out[c] = table.get((int(subject), int(trial)), "")
    return out


# Post-training clips: carved out of the training clips so GRPO post-trains on motions the prior never
# saw (the prior trains on "train" minus these, split "prior_train"). One or more per activity group,
# chosen by hand; the test clips are unchanged so held-out numbers stay comparable.
POST_TRAIN_CLIPS: tuple[str, ...] = (
    "001_08",
    "002_05",
    "002_09",
    "003_01",
    "005_04",
    "005_08",
    "005_13",
    "005_17",
    "006_04",
    "006_08",
    "006_12",
    "007_05",
    "007_09",
    "131_03_orig",
)
# Validation clips: taken out of the post-training clips (GRPO never trains on them) to select GRPO's checkpoint
# and defaults without the test clips. Rule: per activity group with two or more post-training clips, the one
# with the highest clip id (dance 005_17, basketball 006_12, walks 007_09).
VALIDATION_CLIPS: tuple[str, ...] = ("005_17", "006_12", "007_09")


def make_split(mocap_root: Path, clip_ids: list[str]) -> dict:
    """Fixed split by clip (listed in docs/ego_motion_data.md): train (of which post_train) and test."""
    unknown = [c for c in TEST_CLIPS + POST_TRAIN_CLIPS + VALIDATION_CLIPS if c not in clip_ids]
    if unknown:
        raise ValueError(f"split clips {unknown} were not converted; fix TEST_CLIPS / POST_TRAIN_CLIPS or the mocap "
                         "folder.")
    return {
        "description": "CMU clips in the AMASS layout at 30 fps; split by clip, held-out clips cover every "
        "subject and activity group. post_train and validation are disjoint subsets of train held out from the "
        "prior (prior_train = train minus both): GRPO post-trains on post_train; validation (per activity group with "
        "two or more post-training clips, the one with the highest clip id) selects the GRPO checkpoint and defaults.",
        "train": [c for c in clip_ids if c not in TEST_CLIPS],
        "post_train": [c for c in clip_ids if c in POST_TRAIN_CLIPS and c not in VALIDATION_CLIPS],
        "validation": [c for c in clip_ids if c in VALIDATION_CLIPS],
        "test": [c for c in clip_ids if c in TEST_CLIPS],
        "clips": describe_clips(mocap_root, clip_ids),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mocap-root", type=Path, default=DEFAULT_MOCAP_ROOT)
    parser.add_argument(
        "--reactidle",
        action="store_true",
        help="convert the ReActIdle idle clips (MOCAP_ROOT/reactidle) instead of the CMU clips",
    )
    parser.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        type=Path,
        default=None,
        help=f"output folder (default {ASSETS / 'cmu'}; with --reactidle {REACTIDLE_DEFAULT_OUT}, not committed)",
    )
    parser.add_argument("--body-model", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    body = load_body_model(args.body_model, dtype=torch.float64)
    if args.reactidle:
        out = args.out or REACTIDLE_DEFAULT_OUT
        frames = convert_reactidle(args.mocap_root, out, body)
        logger.info("wrote %d ReActIdle clips, %d frames (%.1f min at %g fps) to %s", len(frames),
                    sum(frames.values()), sum(frames.values()) / TARGET_FPS / 60, TARGET_FPS, out)
        return
    args.out = args.out or ASSETS / "cmu"
    files = sorted(args.mocap_root.glob("cmu_iclone/*/*.bvh")) + sorted(
        args.mocap_root.glob("cmu_original/*.bvh")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for path in files:
        try:
            seq = convert_bvh(path, body, mocap_root=args.mocap_root)
        except ValueError as err:
            logger.warning("skipped %s: %s", path, err)
            continue
        save_amass_npz(args.out / f"{clip_id(path)}.npz", seq)
        logger.info("%s: %d frames", clip_id(path), seq.num_frames)
    shutil.copy(args.mocap_root / "NOTICE.md", args.out / "NOTICE.md")
    split = make_split(args.mocap_root, sorted(p.stem for p in args.out.glob("*.npz")))
    (args.out.parent / "split.json").write_text(json.dumps(split, indent=2) + "\n")


if __name__ == "__main__":
    main()
