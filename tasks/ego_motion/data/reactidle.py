"""The ReActIdle idle clips in the AMASS layout (``python -m tasks.ego_motion.data.convert --reactidle``).

Why apart from the CMU conversion: the clips come with their own licence and citation, which must
travel with the converted files (``NOTICE.md``, ``LICENSE.txt``), and are written outside the
repository (``runs/reactidle_amass``); the retargeting is the same (``retarget.convert_bvh`` with the
``reactidle`` skeleton variant).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..body.body_model import BodyModel
from .amass import save_amass_npz
from .retarget import convert_bvh

logger = logging.getLogger(__name__)

REACTIDLE_DEFAULT_OUT = Path("runs/reactidle_amass")
REACTIDLE_NOTICE = """# ReActIdle clips in the AMASS layout

Converted by `python -m tasks.ego_motion.data.convert --reactidle` (diffgrpo, tasks/ego_motion/data/convert.py):
each BVH clip of `reactidle/{acted,genuine}/` retargeted onto the body model (SMPL-H joint order,
rotation transfer, fitted betas, floor from the lowest toe joint) and resampled from 24 to 30 fps.
One `.npz` per clip, named after its BVH file (`001_acted.npz`; the number is the performer).

Source: the ReActIdle idle-motion dataset of "Evaluating Idle Animation Believability: a User
Perspective", Atxa Landa et al., 2025, arXiv 2509.05023. Cite it where these files are used.

Licence: MIT, full text in `LICENSE.txt` beside this file; it must travel with these files.

Content: people standing still, shifting weight, looking around; no locomotion, no hands (zero
hand pose), no toe or wrist motion (neutral local rotations).
"""


def convert_reactidle(mocap_root: Path, out: Path, body: BodyModel) -> dict[str, int]:
    """Convert every ReActIdle clip under ``mocap_root/reactidle`` into ``out`` (AMASS layout).

    Writes ``<clip>.npz`` per BVH file (clip = file stem), ``LICENSE.txt`` (the MIT licence, copied)
    and ``NOTICE.md`` (source and citation). Returns clip -> frames at 30 fps; unusable clips are
    logged and skipped, and if every clip is, raises ValueError.
    """
    source = mocap_root / "reactidle"
    files = sorted(source.rglob("*.bvh"))
    if not files or not (source / "LICENSE.txt").is_file():
        raise FileNotFoundError(
            f"expected ReActIdle BVH files and LICENSE.txt under {source}; pass --mocap-root (or set "
            "DIFFGRPO_MOCAP_ROOT) to the folder holding reactidle/."
        )
    out.mkdir(parents=True, exist_ok=True)
    frames: dict[str, int] = {}
    for path in files:
        try:
            seq = convert_bvh(path, body, mocap_root=mocap_root)
        except ValueError as err:
            logger.warning("skipped %s: %s", path, err)
            continue
        save_amass_npz(out / f"{path.stem}.npz", seq)
        frames[path.stem] = seq.num_frames
        logger.info("%s: %d frames", path.stem, seq.num_frames)
    if not frames:
        raise ValueError(f"none of the {len(files)} BVH files under {source} could be converted (see the log).")
    shutil.copyfile(source / "LICENSE.txt", out / "LICENSE.txt")  # contents only: the source may be read-only
    (out / "NOTICE.md").write_text(REACTIDLE_NOTICE)
    return frames
