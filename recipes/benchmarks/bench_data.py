"""Benchmark the ego-motion data pipeline: cache build time and window throughput from the cache.

Why: training draws random batches of windows every step; the loader must not be the bottleneck,
and a first run (or a changed setting) rebuilds the cache, so its cost should be known. For each
window length this builds the train and test splits of the bundled CMU clips (or ``--source-root``)
into a fresh temporary cache (timed, wall clock), then times ``EgoMotionWindows.get`` on random
batches of ``--batch-size`` train windows (indices drawn with replacement from a seeded generator).

Run:  python recipes/benchmarks/bench_data.py --output bench_data.md
"""

from __future__ import annotations

import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import tyro

from tasks.ego_motion.data.sequences import WindowConfig
from tasks.ego_motion.data.splits import BUNDLED_CMU_DIR, BUNDLED_SPLIT_FILE, DataSource
from tasks.ego_motion.data.windows import load_windows


@dataclass(frozen=True)
class Config:
    """Data pipeline benchmark."""

    window_frames: tuple[int, ...] = (128, 64)
    """Window lengths T to benchmark (128 = reference, 64 = CPU demo)."""
    batch_size: int = 64
    """Windows per random batch."""
    num_batches: int = 50
    """Timed batches per window length (after 3 untimed warm-up batches)."""
    source_root: Path = BUNDLED_CMU_DIR
    """Folder of AMASS-layout .npz files."""
    split_file: Path = BUNDLED_SPLIT_FILE
    """Train/test split JSON for source_root."""
    seed: int = 0
    """Seeds the batch indices."""
    output: Path | None = None
    """Also write the markdown table to this file."""


def bench_one(cfg: Config, window_frames: int, cache_dir: Path) -> dict[str, float]:
    source = DataSource(root=cfg.source_root, split_file=cfg.split_file)
    config = WindowConfig(window_frames=window_frames)
    start = time.perf_counter()
    train = load_windows("train", source=source, config=config, cache_dir=cache_dir)
    build_train_s = time.perf_counter() - start
    start = time.perf_counter()
    test = load_windows("test", source=source, config=config, cache_dir=cache_dir)
    build_test_s = time.perf_counter() - start
    start = time.perf_counter()
    reloaded = load_windows("train", source=source, config=config, cache_dir=cache_dir)
    reload_s = time.perf_counter() - start
    assert reloaded.from_cache and not train.from_cache

    gen = torch.Generator().manual_seed(cfg.seed)
    draws = [torch.randint(len(reloaded), (cfg.batch_size,), generator=gen)
             for _ in range(cfg.num_batches + 3)]
    for idx in draws[:3]:
        reloaded.get(idx)
    start = time.perf_counter()
    for idx in draws[3:]:
        batch = reloaded.get(idx)
    get_s = time.perf_counter() - start
    assert batch["body_rotmats"].shape == (cfg.batch_size, window_frames, 21, 3, 3)
    return {
        "T": window_frames, "train_windows": len(train), "test_windows": len(test),
        "frames_30fps": train.summary["frames_30fps"] + test.summary["frames_30fps"],
        "files": train.summary["files"] + test.summary["files"],
        "build_train_s": build_train_s, "build_test_s": build_test_s, "reload_s": reload_s,
        "windows_per_s": cfg.num_batches * cfg.batch_size / get_s,
        "batch_ms": 1e3 * get_s / cfg.num_batches,
    }  # fmt: skip


def to_markdown(cfg: Config, rows: list[dict[str, float]]) -> str:
    lines = [
        f"Ego-motion data pipeline ({cfg.source_root.name}; {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}, batch {cfg.batch_size}, {cfg.num_batches} batches)",
        "",
        "| T | files | frames @30 fps in windowed clips | train windows (incl. mirrored) | test windows "
        "| build train (s) | build test (s) | reopen cache (s) | windows/s from cache | ms / batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {r['files']} | {r['frames_30fps']} | {r['train_windows']} "
                     f"| {r['test_windows']} | {r['build_train_s']:.2f} | {r['build_test_s']:.2f} "
                     f"| {r['reload_s']:.3f} "
                     f"| {r['windows_per_s']:.0f} | {r['batch_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> str:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        rows = [bench_one(cfg, t, Path(tmp) / f"T{t}") for t in cfg.window_frames]
    table = to_markdown(cfg, rows)
    print(table)  # noqa: T201 - a recipe's report
    if cfg.output is not None:
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        cfg.output.write_text(table)
    return table


if __name__ == "__main__":
    main(tyro.cli(Config))
