"""Benchmark: one batched `reverse_step` versus a per-element loop over diffusers' `DDIMScheduler.step`.

Why: GRPO batches hold steps at different timesteps (each element of a re-scoring batch sits at its own
t), and diffusers' `step()` takes one timestep per call, so without `diffgrpo.sde` a user loops over the
batch. This measures what batching buys; the batched call also returns std and the log-density, which
the loop does not.

    python recipes/benchmarks/bench_sde.py                      # prints a markdown table
    python recipes/benchmarks/bench_sde.py --output bench.md    # also appends the table to bench.md
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from diffusers import DDIMScheduler

from diffgrpo.sde import reverse_step


@dataclass(frozen=True)
class Config:
    shapes: tuple[str, ...] = ("256,4,16,16", "256,128,226")
    """Sample shapes, comma-separated, batch first (B elements, each at its own timestep)."""
    eta: float = 1.0
    """DDIM eta for both paths."""
    num_inference_steps: int = 50
    """DDIM schedule length; element i sits at timesteps[i % num_inference_steps]."""
    repeats: int = 7
    """Timed repetitions per path; the fastest is reported (least disturbed by other load on the machine)."""
    warmup: int = 1
    """Untimed repetitions before timing."""
    num_threads: int | None = None
    """torch intra-op threads (None keeps torch's default)."""
    device: str = "cpu"
    """Device to run on ("cpu" or "cuda")."""
    seed: int = 0
    """Seed for inputs and noise."""
    output: Path | None = None
    """If set, append the markdown table to this file (printing happens either way)."""


def _best_seconds(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_shape(cfg: Config, shape: tuple[int, ...]) -> dict[str, float]:
    """Best-of-N seconds of each path on one sample shape, plus a check that they agree on the mean."""
    device = torch.device(cfg.device)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(cfg.num_inference_steps)
    batch = shape[0]
    timesteps = sched.timesteps[torch.arange(batch) % cfg.num_inference_steps]  # (B,) one t per element
    x_t = torch.randn(shape, generator=gen, device=device)
    model_out = torch.randn(shape, generator=gen, device=device)

    def batched() -> object:
        return reverse_step(sched, model_out, timesteps, x_t, eta=cfg.eta, generator=gen)

    prev = batched().prev_sample

    def batched_scoring() -> object:  # the policy update's call: re-score stored steps, no sampling
        return reverse_step(sched, model_out, timesteps, x_t, eta=cfg.eta, prev_sample=prev)

    t_list = timesteps.tolist()

    def loop() -> object:
        return [
            sched.step(model_out[i : i + 1], t, x_t[i : i + 1], eta=cfg.eta, generator=gen).prev_sample
            for i, t in enumerate(t_list)
        ]

    zeros = torch.zeros((1,) + shape[1:], device=device)
    ours = reverse_step(sched, model_out, timesteps, x_t, eta=cfg.eta, prev_sample=x_t).mean
    for i in range(0, batch, max(batch // 8, 1)):
        ref = sched.step(model_out[i : i + 1], t_list[i], x_t[i : i + 1], eta=cfg.eta, variance_noise=zeros)
        if not torch.allclose(ours[i : i + 1], ref.prev_sample, atol=1e-4):
            raise RuntimeError(f"batched mean disagrees with DDIMScheduler.step at element {i}; not timing.")

    return {
        "batch": batch,
        "loop_s": _best_seconds(loop, cfg.repeats, cfg.warmup, device),
        "batched_s": _best_seconds(batched, cfg.repeats, cfg.warmup, device),
        "scoring_s": _best_seconds(batched_scoring, cfg.repeats, cfg.warmup, device),
    }


def main(cfg: Config) -> str:
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    lines = [
        f"DDIM eta={cfg.eta}, {cfg.num_inference_steps} steps, device={cfg.device}, "
        f"torch threads={torch.get_num_threads()}, best of {cfg.repeats}",
        "",
        "| sample shape | loop of `DDIMScheduler.step` (ms) | batched `reverse_step`, sampling (ms) "
        "| same, scoring a given `prev_sample` (ms) | loop elem/s | batched elem/s | speed-up (sampling) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for spec in cfg.shapes:
        shape = tuple(int(n) for n in spec.split(","))
        r = bench_shape(cfg, shape)
        lines.append(
            f"| ({spec}) | {1e3 * r['loop_s']:.1f} | {1e3 * r['batched_s']:.1f} | {1e3 * r['scoring_s']:.1f} "
            f"| {r['batch'] / r['loop_s']:.0f} | {r['batch'] / r['batched_s']:.0f} "
            f"| {r['loop_s'] / r['batched_s']:.1f}x |"
        )
    table = "\n".join(lines) + "\n"
    if cfg.output is not None:
        with cfg.output.open("a") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    print(main(tyro.cli(Config)))
