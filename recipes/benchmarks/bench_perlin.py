"""Benchmark: batched torch `pnoise1` versus a Python loop over the `noise` package's `pnoise1`.

Why: the Perlin condition perturbation (MotionGRPO section 8) needs one smooth curve per group
member and axis at every training step. The reference `noise.pnoise1` is a scalar C function, so
without `diffgrpo.perturb` a user loops over (member, frame, axis). This times both on the same
float32 sample positions, offset[m, a] + t * frequency with offsets ~ U[0, offset_range), and
checks that the values agree exactly.

Two loop baselines are timed:
- "loop (perturber)": what a perturber built on the package does: a keyword call per element
  with the configured octave settings, then a float32 tensor built from the results;
- "loop (bare)": positional calls over a flat list of pre-made Python floats, no tensor built;
  the cheapest a Python loop can be (a lower bound on the loop's cost).
The torch timing includes computing the positions from the offsets.

    python recipes/benchmarks/bench_perlin.py                      # prints a markdown table
    python recipes/benchmarks/bench_perlin.py --output bench.md    # also writes it to bench.md
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import noise
import torch
import tyro

from diffgrpo.perturb import pnoise1


@dataclass(frozen=True)
class Config:
    """Perlin benchmark settings (defaults: the Perlin perturber's defaults)."""

    members: int = 64
    """Group members (leading batch)."""
    frames: int = 128
    """Frames T along which the noise is smooth."""
    axes: int = 3
    """Channels D (x, y, z of the head translation)."""
    frequency: float = 1.0 / 32.0
    """Lattice cells per frame."""
    offset_range: float = 256.0
    """Offsets drawn in [0, offset_range) cells."""
    octaves: int = 1
    persistence: float = 0.5
    lacunarity: float = 2.0
    torch_repeats: int = 200
    """Timed calls of the batched version (after 5 warm-up calls)."""
    loop_repeats: int = 10
    """Timed runs of each loop."""
    device: str = "cpu"
    """Device of the batched version ('cpu' or 'cuda')."""
    threads: int = 1
    """torch CPU threads (1: a fair single-core comparison with the loop)."""
    seed: int = 0
    output: Path | None = None
    """Also write the markdown table to this file."""


def time_calls(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(cfg: Config) -> str:
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = (torch.rand(cfg.members, 1, cfg.axes, generator=gen) * cfg.offset_range).to(device)
    frames = torch.arange(cfg.frames, dtype=torch.float32, device=device)[:, None]
    octave_kwargs = dict(octaves=cfg.octaves, persistence=cfg.persistence, lacunarity=cfg.lacunarity)

    def batched() -> torch.Tensor:
        return pnoise1(offsets + frames * cfg.frequency, **octave_kwargs)  # (M, T, D)

    positions = (offsets + frames * cfg.frequency).cpu()  # the same float32 inputs for the loops
    nested = positions.tolist()
    flat = positions.flatten().tolist()

    def loop_perturber() -> torch.Tensor:
        out = [
            [[noise.pnoise1(p, **octave_kwargs, repeat=1024, base=0) for p in row] for row in member]
            for member in nested
        ]
        return torch.tensor(out, dtype=torch.float32)

    def loop_bare() -> list[float]:
        pn = noise.pnoise1
        if cfg.octaves == 1:
            return [pn(p) for p in flat]
        return [pn(p, cfg.octaves, cfg.persistence, cfg.lacunarity) for p in flat]

    for _ in range(5):
        result = batched()
    reference = loop_perturber()
    max_diff = (result.cpu() - reference).abs().max().item()
    bare_diff = (result.cpu().flatten() - torch.tensor(loop_bare())).abs().max().item()

    t_torch = time_calls(batched, cfg.torch_repeats, sync)
    t_loop = time_calls(loop_perturber, cfg.loop_repeats, lambda: None)
    t_bare = time_calls(loop_bare, cfg.loop_repeats, lambda: None)

    n = cfg.members * cfg.frames * cfg.axes
    med = statistics.median
    rows = [
        ("torch batched `pnoise1`", t_torch, "0 (itself)"),
        ("loop (perturber): keyword calls + tensor", t_loop, f"{max_diff:g}"),
        ("loop (bare): positional calls, flat list", t_bare, f"{bare_diff:g}"),
    ]
    lines = [
        f"Perlin `pnoise1`, {cfg.members} members x {cfg.frames} frames x {cfg.axes} axes = {n} values, "
        f"frequency {cfg.frequency:g} cells/frame, offsets in [0, {cfg.offset_range:g}), "
        f"octaves {cfg.octaves}; torch {torch.__version__} on {cfg.device} ({cfg.threads} thread(s)), "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}. Best and "
        "median wall time; the speed-ups compare best with best and median with median.",
        "",
        "| method | best (ms) | median (ms) | speed-up (best) | speed-up (median) | max abs diff vs torch |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {min(t) * 1e3:.3f} | {med(t) * 1e3:.3f} | "
            f"{min(t) / min(t_torch):.1f}x | {med(t) / med(t_torch):.1f}x | {diff} |"
            for name, t, diff in rows
        ),
    ]
    table = "\n".join(lines)
    print(table)
    if cfg.output is not None:
        cfg.output.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main(tyro.cli(Config))
