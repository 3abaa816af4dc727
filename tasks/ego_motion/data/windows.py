"""AMASS-layout motion files -> fixed-length training windows of head poses and body targets.

Three modules, one stage each: ``splits`` (which files form which split), ``sequences`` (one file ->
one processed sequence, steps 1-6 below) and this one (sequences -> windows, steps 7-8, and their
``datasets`` cache).

Why: the prior learns p(body | head trajectory) on windows of T frames (docs/ego_motion_data.md,
docs/ego_motion_prior.md). Each window holds T+1 headset poses ``T_world_cpf`` (the condition of frame t needs the pose
at t-1, so T+1 poses give T conditioned frames) and the T frames of targets that follow the first
pose. Processing (FK, contacts, mirroring) is done once and cached with HF ``datasets``.

Per sequence (one ``.npz`` in AMASS layout: ``poses`` (N, 156) axis-angle = root 3 + body 63 +
hands 90, ``trans`` (N, 3) metres, ``betas`` (10 or 16,), ``gender``, ``mocap_framerate``):
1. Resample to 30 fps: an integer multiple of 30 (60, 120, ...) is decimated (every k-th frame);
   any other positive rate is interpolated at t = k / 30 s (quaternion slerp of every joint
   rotation, linear interpolation of ``trans``); 30 fps is kept as is.
2. Betas are zero-padded to 16 (AMASS files with 10 betas: the missing coefficients are 0, the
   mean shape along those directions). ``gender`` is ignored: the body model is neutral.
3. Joints-only FK through :class:`~tasks.ego_motion.body.body_model.BodyModel` (never the mesh):
   ``T_world_root = [R(root_orient) | trans + J_0(betas)]``, joints (N, 52).
4. Floor: by default the source's z = 0 is trusted (AMASS fits and the converted CMU clips stand
   on z = 0); ``refloor="lowest_foot_joint"`` instead shifts each sequence so its lowest ankle/toe
   joint touches z = 0. Either way a sequence whose lowest foot joint is more than
   ``FLOOR_WARNING_M`` from z = 0 is logged, since its contacts will be wrong.
5. Contacts of the 21 non-root body joints: 1 where both the joint's speed and its height above
   z = 0 are below its family's thresholds (:class:`ContactThresholds`: ankles 0.15 m, toes 0.10 m,
   knees and wrists 0.15 m, other joints 0.20 m; 0.3 m/s for ankles and toes, 0.2 m/s otherwise).
   They only see the floor: a hand on a table is not a contact.
6. Headset: ``T_world_cpf = T_world_root @ T_root_head @ T_head_cpf`` (``BodyModel.T_world_cpf_from_root``),
   i.e. the FK head joint pose times the fixed CPF offset.
7. Windows start every ``stride`` frames at frame s: ``T_world_cpf`` = frames s..s+T and the
   targets = frames s+1..s+T. ``start_frame`` stores s. A tail shorter than a stride is dropped.
8. Train only (``include_mirrored``): a left/right mirrored copy of every window (body_model.py's
   mirroring; FK, contacts and headset recomputed from the mirrored rotations and root).

Files named ``shape.npz`` (AMASS's per-subject betas, no motion) are not sequences and are not listed.

Splits, all clip-disjoint: "test" (held out), "train" (everything else), and "train" cut in two for
post-training: "post_train" (clips the prior never sees; GRPO post-trains on them) and
"prior_train" (train minus post_train; the prior trains on it). The bundled CMU clips (default)
use ``assets/split.json`` ({"train": [...], "post_train": [...], "test": [...]}, clip names with
or without ``.npz``; "post_train" is optional and must be a subset of "train"); a directory of
AMASS files can instead use EgoAllo's rule (test = top-level folders ``Transitions_mocap`` and
``SSM_synced``, train = the rest, post_train = a fixed share of train chosen by a hash of each
file's relative path).
``DataSource.extra_prior_train_dir`` adds a second folder of AMASS files (e.g. the converted
ReActIdle idle clips) to "prior_train" only: "train", "post_train" and "test" are unchanged, and
those windows are named ``extra_prior_train/<path below that folder>``. ``extra_post_train_dir``
does the same for "post_train" (``extra_post_train/...``), e.g. head trajectories for
ground-truth-free post-training.

Cache: ``<cache_dir>/<split>-<fingerprint>/`` (``datasets.save_to_disk``), cache_dir defaulting
to ``$DIFFGRPO_CACHE/ego_motion`` or ``~/.cache/diffgrpo/ego_motion``. The fingerprint is a
SHA-256 over the relative path and the SHA-256 of the *bytes* of every source file (content, not
mtimes: copies and touches do not rebuild, edits do), the body model file's bytes, every setting
and ``DATA_VERSION``; change any of them and the cache is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from tqdm import tqdm

from ..body.body_model import (
    BodyModel,
    default_body_model_path,
    load_body_model,
)
from ..body.geometry import (
    NUM_BETAS,
    NUM_BODY_JOINTS,
    NUM_HAND_JOINTS,
    NUM_METRIC_JOINTS,
)
from .amass import TARGET_FPS
from .sequences import (
    MotionSequence,
    SkippedSequence,
    WindowConfig,
    load_sequence,
    mirror_sequence,
)
from .splits import (
    TRAINING_SPLITS,
    DataSource,
    Split,
    _source_key,
)

logger = logging.getLogger(__name__)

DATA_VERSION = "ego_motion.data/1"
"""Bump when the processing changes in a way the settings do not capture: every cache rebuilds."""
AMASS_POSE_DIM = 3 * (1 + NUM_BODY_JOINTS + NUM_HAND_JOINTS)  # 156
ENV_CACHE_ROOT = "DIFFGRPO_CACHE"
SUMMARY_FILE = "diffgrpo_ego_motion.json"
TENSOR_COLUMNS: tuple[str, ...] = ("T_world_cpf", "betas", "body_rotmats", "hand_rotmats", "contacts",
                                   "T_world_root", "joints_world", "start_frame", "mirrored")


def window_starts(num_frames: int, window_frames: int, stride_frames: int) -> list[int]:
    """Start frames s with s + T + 1 <= N, every stride frames: (N - T - 1) // stride + 1 of them."""
    return list(range(0, num_frames - window_frames, stride_frames))


def iter_windows(seq: MotionSequence, window_frames: int, stride_frames: int, mirrored: bool
                 ) -> Iterator[dict[str, object]]:
    """Rows of the dataset: T+1 headset poses from frame s, T frames of targets from s + 1."""
    T = window_frames
    for s in window_starts(seq.num_frames, T, stride_frames):
        tgt = slice(s + 1, s + 1 + T)
        yield {
            "T_world_cpf": seq.T_world_cpf[s : s + T + 1].numpy(), "betas": seq.betas.numpy(),
            "body_rotmats": seq.body_rotmats[tgt].numpy(), "hand_rotmats": seq.hand_rotmats[tgt].numpy(),
            "contacts": seq.contacts[tgt].numpy(), "T_world_root": seq.T_world_root[tgt].numpy(),
            "joints_world": seq.joints_world[tgt].numpy(), "sequence": seq.name, "start_frame": s,
            "mirrored": mirrored,
        }  # fmt: skip


def window_features(window_frames: int) -> datasets.Features:
    """Arrow schema of one window row (fixed shapes, float32 arrays; see :class:`EgoMotionWindows`)."""
    T = window_frames
    f32 = "float32"
    return datasets.Features({
        "T_world_cpf": datasets.Array3D((T + 1, 4, 4), f32),
        "betas": datasets.List(datasets.Value(f32), length=NUM_BETAS),
        "body_rotmats": datasets.Array4D((T, NUM_BODY_JOINTS, 3, 3), f32),
        "hand_rotmats": datasets.Array4D((T, NUM_HAND_JOINTS, 3, 3), f32),
        "contacts": datasets.Array2D((T, NUM_BODY_JOINTS), f32),
        "T_world_root": datasets.Array3D((T, 4, 4), f32),
        "joints_world": datasets.Array3D((T, NUM_METRIC_JOINTS, 3), f32),
        "sequence": datasets.Value("string"),
        "start_frame": datasets.Value("int64"), "mirrored": datasets.Value("bool"),
    })  # fmt: skip


# ---------------------------------------------------------------- cache
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$DIFFGRPO_CACHE/ego_motion`` if the variable is set, else ``~/.cache/diffgrpo/ego_motion``."""
    root = os.environ.get(ENV_CACHE_ROOT)
    return (Path(root).expanduser() if root else Path("~/.cache/diffgrpo").expanduser()) / "ego_motion"


def cache_fingerprint(files: Sequence[Path], root: Path, body_model_path: Path, cfg: WindowConfig,
                      split: Split, extra_root: Path | None = None) -> str:
    """SHA-256 (first 20 hex digits) of source file paths + contents, body model bytes and settings.

    Paths are relative to root, or ``extra_<split>/...`` below extra_root (the split's extra clips)."""
    settings = {"version": DATA_VERSION, "split": split, "fps": TARGET_FPS,
                "window_frames": cfg.window_frames,
                "stride_frames": cfg.stride(split), "mirror": cfg.include_mirrored and split in TRAINING_SPLITS,
                "refloor": cfg.refloor, "contacts": dataclasses.asdict(cfg.contacts),
                "body_model_sha256": _sha256_file(body_model_path),
                "files": [[_source_key(p, root, extra_root, split), _sha256_file(p)] for p in files]}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def build_windows_dataset(files: Sequence[Path], root: Path, model: BodyModel, cfg: WindowConfig,
                          split: Split, out_dir: Path, fingerprint: str, extra_root: Path | None = None
                          ) -> dict[str, object]:
    """Process every file into windows and ``save_to_disk`` them at out_dir; returns the build summary.

    Unusable files are skipped with a warning naming the file and the reason; if all are, raises.
    """
    stride = cfg.stride(split)
    mirror = cfg.include_mirrored and split in TRAINING_SPLITS
    skipped: dict[str, str] = {}
    counts = {"sequences": 0, "frames_30fps": 0, "windows": 0}

    def generate() -> Iterator[dict[str, object]]:
        for path in tqdm(files, desc=f"ego_motion {split} windows", unit="file", disable=len(files) < 20):
            name = _source_key(path, root, extra_root, split).removesuffix(".npz")
            try:
                with torch.no_grad():
                    seq = load_sequence(path, model, cfg, name=name)
                    mirrored = mirror_sequence(seq, model, cfg.contacts) if mirror else None
            except SkippedSequence as err:
                logger.warning("skipping %s: %s", path, err)
                skipped[str(path)] = str(err)
                continue
            counts["sequences"] += 1
            counts["frames_30fps"] += seq.num_frames
            for copy, is_mirror in ((seq, False), (mirrored, True)):
                if copy is not None:
                    for row in iter_windows(copy, cfg.window_frames, stride, mirrored=is_mirror):
                        counts["windows"] += 1
                        yield row

    scratch = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    # Per-sequence tensors are small ((N, 52, 3, 3), N ~ 10^3): intra-op threads only add overhead,
    # which grows to 30x when the cores are shared (measured: axis_angle_to_matrix on 688 x 52).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            ds = datasets.Dataset.from_generator(generate, features=window_features(cfg.window_frames),
                                                 cache_dir=str(scratch / "arrow"), fingerprint=fingerprint)
        except datasets.exceptions.DatasetGenerationError as err:
            raise (err.__cause__ or err) from err  # the generator's own error, not datasets' wrapper
        except ValueError as err:  # datasets refuses a generator that yields no rows
            if counts["windows"]:
                raise
            raise ValueError(f"no {cfg.window_frames}-frame windows for split '{split}' from {len(files)} "
                             f"files; skipped: {skipped}. Fix or remove those files, or lower window_frames."
                             ) from err
        if skipped:
            logger.warning("ego_motion %s: skipped %d of %d files: %s", split, len(skipped), len(files),
                           "; ".join(f"{Path(p).name}: {why}" for p, why in skipped.items()))
        ds.save_to_disk(str(scratch / "dataset"))
        summary = {"fingerprint": fingerprint, "skipped": skipped, **counts, "files": len(files),
                   "settings": dataclasses.asdict(cfg), "split": split}
        (scratch / "dataset" / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        del ds
        if (out_dir / SUMMARY_FILE).exists():  # another process finished the same build first: keep theirs
            logger.info("ego_motion %s: %s was built concurrently; using that copy", split, out_dir)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)  # leftovers of an interrupted build
            os.replace(scratch / "dataset", out_dir)
    finally:
        torch.set_num_threads(num_threads)
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


# ---------------------------------------------------------------- torch-facing accessor
class EgoMotionWindows:
    """Cached windows of one split as batched torch tensors; build with :func:`load_windows`.

    ``get(indices)`` returns, for B = len(indices) and T = window_frames, float32 unless noted:
    T_world_cpf (B, T+1, 4, 4), betas (B, 16), body_rotmats (B, T, 21, 3, 3), hand_rotmats
    (B, T, 30, 3, 3), contacts (B, T, 21), T_world_root (B, T, 4, 4), joints_world (B, T, 22, 3),
    start_frame (B,) int64 (frame of T_world_cpf[:, 0]; targets start one frame later), mirrored (B,) bool.

    ``dataset`` is the same data as a ``with_format("torch")`` HF dataset. ``get`` returns identical
    tensors but gathers rows from zero-copy numpy views of the memory-mapped Arrow columns: the
    torch formatter converts fixed-shape arrays row by row, about 50x slower for batches of 64
    (recipes/benchmarks/bench_data.py).
    """

    def __init__(self, dataset: datasets.Dataset, *, path: Path, summary: dict, from_cache: bool):
        self.path = path
        self.summary = summary
        self.from_cache = from_cache
        """True when the windows were loaded from an existing cache, False when built now."""
        self.window_frames = int(summary["settings"]["window_frames"])
        self.dataset = dataset.with_format("torch", columns=list(TENSOR_COLUMNS))
        self._names = dataset["sequence"]
        table = dataset.data.table  # memory-mapped pyarrow.Table (no indices mapping after load_from_disk)
        self._chunk_starts = np.cumsum([0] + [len(c) for c in table.column(TENSOR_COLUMNS[0]).chunks])
        self._columns = {name: [_numpy_view(c, _feature_shape(dataset.features[name]))
                                for c in table.column(name).chunks] for name in TENSOR_COLUMNS}

    def __len__(self) -> int:
        return int(self._chunk_starts[-1])

    def get(self, indices: Sequence[int] | Tensor) -> dict[str, Tensor]:
        """Batched windows at ``indices`` (any order, repeats and negative indices allowed)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64).reshape(-1)
        if idx.size and not (idx.min() >= -len(self) and idx.max() < len(self)):
            raise IndexError(f"window indices must be in [-{len(self)}, {len(self)}), "
                             f"got {idx.min()}..{idx.max()}.")
        idx = idx % max(len(self), 1)
        chunk = np.searchsorted(self._chunk_starts, idx, side="right") - 1
        out = {}
        for name, views in self._columns.items():
            if len(views) == 1:
                out[name] = torch.from_numpy(views[0][idx])
                continue
            batch = np.empty((idx.size, *views[0].shape[1:]), dtype=views[0].dtype)
            for c in np.unique(chunk):
                rows = chunk == c
                batch[rows] = views[c][idx[rows] - self._chunk_starts[c]]
            out[name] = torch.from_numpy(batch)
        return out

    def sequence_names(self, indices: Sequence[int]) -> list[str]:
        """Source sequence of each window (path relative to the source root, no ``.npz``)."""
        return [self._names[int(i)] for i in indices]


def _feature_shape(feature: object) -> tuple[int, ...]:
    if isinstance(feature, datasets.Array2D | datasets.Array3D | datasets.Array4D):
        return tuple(feature.shape)
    if isinstance(feature, datasets.List):
        return (feature.length,)
    return ()


def _numpy_view(chunk: pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """(rows, *shape) numpy view of an Arrow column chunk of nested fixed-shape lists; copies only bools."""
    rows = len(chunk)
    if isinstance(chunk, pa.ExtensionArray):
        chunk = chunk.storage
    while pa.types.is_list(chunk.type) or pa.types.is_fixed_size_list(chunk.type):
        chunk = chunk.flatten()  # respects the chunk's offset: still zero-copy
    values = chunk.to_numpy(zero_copy_only=not pa.types.is_boolean(chunk.type))
    return values.reshape(rows, *shape)


def load_windows(
    split: Split,
    *,
    source: DataSource | None = None,
    config: WindowConfig | None = None,
    body_model_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> EgoMotionWindows:
    """Windows of ``split``, from the cache when its fingerprint matches, else built and cached.

    source: default the bundled CMU clips with their split.json. config: default WindowConfig()
    (T = 128, train stride 64, test stride 128, mirrored train copies). body_model_path: default
    ``$DIFFGRPO_SMPLH_PATH`` or the bundled model. cache_dir: default :func:`default_cache_dir`.
    """
    source = source or DataSource()
    config = config or WindowConfig()
    root = Path(source.root).expanduser().resolve()
    extra_root = None if source.extra_dir(split) is None else Path(source.extra_dir(split)).expanduser().resolve()
    files = dataclasses.replace(source, root=root, **{f"extra_{split}_dir": extra_root} if extra_root else {}
                                ).files(split)
    model_path = Path(body_model_path).expanduser() if body_model_path else default_body_model_path()
    if not model_path.exists():
        load_body_model(model_path)  # raises the body model's own error with the download hint
    fingerprint = cache_fingerprint(files, root, model_path, config, split, extra_root)
    out_dir = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / f"{split}-{fingerprint}"
    from_cache = (out_dir / SUMMARY_FILE).exists()
    if from_cache:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
        logger.info("ego_motion %s: %d windows from cache %s (%d files skipped at build)", split,
                    summary["windows"], out_dir, len(summary["skipped"]))
    else:
        logger.info("ego_motion %s: building windows from %d files under %s into %s", split, len(files), root,
                    out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        summary = build_windows_dataset(files, root, load_body_model(model_path), config, split, out_dir,
                                        fingerprint, extra_root)
    return EgoMotionWindows(datasets.load_from_disk(str(out_dir)), path=out_dir, summary=summary,
                            from_cache=from_cache)
