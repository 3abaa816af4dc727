"""Benchmarks of the step with its log-probability: what batching buys, and what one call costs.

1. ``batched``: one batched `reverse_step` versus a per-element loop over diffusers' `DDIMScheduler.step`.
   Why: GRPO batches hold steps at different timesteps (each element of a re-scoring batch sits at its own
   t), and diffusers' `step()` takes one timestep per call, so without `diffgrpo.sde` a user loops over the
   batch. The batched call also returns std and the log-density, which the loop does not.
2. ``per_call``: the cost of one flow-matching SDE step with its log-density, as a rollout calls it
   (`diffgrpo.chain.step_with_logprob`, its coefficients computed when the chain was made), against the
   same step written as a plain per-call formula (the Flow-GRPO SDE mean, std and Gaussian log-density
   in a few torch lines, no checks), against `reverse_step` (the general call that reads the schedule's
   tables per call), and, when ``--flow-grpo-module`` names it, flow_grpo's `sde_step_with_logprob`
   (e.g. ``PYTHONPATH=/tmp/flowgrpo_ref`` holding a copy of its `sd3_sde_with_logprob.py`, read for
   measurement only). The contenders run interleaved, round after round, so load on a shared machine
   hits them alike; the median per-call time over rounds and the median of the per-round ratios are
   reported.

    python recipes/benchmarks/bench_sde.py                      # prints the markdown tables
    python recipes/benchmarks/bench_sde.py --output bench.md    # also appends them to bench.md
    PYTHONPATH=/tmp/flowgrpo_ref python recipes/benchmarks/bench_sde.py --sections per_call \
        --flow-grpo-module sd3_sde_with_logprob --json-output docs/data/bench_sde_per_call.json
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffgrpo.chain import SamplingChain, step_with_logprob
from diffgrpo.config import SamplerConfig
from diffgrpo.sde import reverse_step


@dataclass(frozen=True)
class Config:
    sections: tuple[str, ...] = ("batched", "per_call")
    """Which benchmarks to run: "batched" (batched vs a loop of diffusers' step), "per_call" (one step's cost)."""
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
    per_call_shapes: tuple[str, ...] = ("8,4,4,4", "8,4,32,32", "8,16,64,64")
    """per_call: latent shapes, batch first."""
    rounds: int = 41
    """per_call: interleaved rounds; each times a batch of calls of every contender."""
    round_ms: float = 30.0
    """per_call: calls per round are chosen so that the plain formula's share of a round takes about this long
    (a scheduler time slice on a loaded machine is a few ms: short rounds measure the load, not the call)."""
    flow_steps: int = 10
    """per_call: flow-matching schedule length (shift 3, SD3's); the step timed is ``flow_step``."""
    flow_step: int = 3
    flow_eta: float = 0.7
    """per_call: the SDE's noise level a (Flow-GRPO's default 0.7)."""
    flow_grpo_module: str | None = None
    """per_call: importable name of a module defining flow_grpo's ``sde_step_with_logprob``; None skips it."""
    flow_grpo_commit: str = "ac4c86e"
    """Recorded with the results: the flow_grpo commit that module was taken from."""
    json_output: Path | None = None
    """per_call: write the measurements (and the machine's load) to this JSON file."""


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


def plain_flow_sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                        generator: torch.Generator, prev_sample: torch.Tensor | None = None):
    """The reference a fused step is held to: Flow-GRPO's SDE step and its summed Gaussian log-density written
    as plain torch arithmetic, with the schedule's numbers already at hand and nothing checked."""
    dt = sigma_next - sigma
    s = eta * math.sqrt(sigma / (1.0 - (sigma_next if sigma >= 1.0 else sigma)))
    mean = x + dt * (v + s * s / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    std = s * math.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    log_prob = -((prev_sample - mean) ** 2) / (2.0 * std * std) - math.log(std) - 0.5 * math.log(2.0 * math.pi)
    return prev_sample, log_prob.sum(dim=tuple(range(1, x.ndim))), mean, std


def _seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls


def _interleaved(contenders: dict[str, Callable[[], object]], cfg: Config, device: torch.device,
                 reference: str) -> tuple[dict[str, list], int]:
    """Per-call seconds of each contender in each round (the contenders one after another within a round), and
    the calls per round: as many as make ``reference`` take about ``cfg.round_ms``."""
    warm = {name: min(_seconds_per_call(fn, 3, device) for _ in range(3)) for name, fn in contenders.items()}
    calls = max(1, round(cfg.round_ms / 1e3 / warm[reference]))
    times: dict[str, list] = {name: [] for name in contenders}
    for _ in range(cfg.rounds):
        for name, fn in contenders.items():
            times[name].append(_seconds_per_call(fn, calls, device))
    return times, calls


def per_call_shape(cfg: Config, shape: tuple[int, ...]) -> dict:
    """Interleaved per-call times of every contender on latents of ``shape``, sampling and scoring."""
    device = torch.device(cfg.device)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(cfg.flow_steps)
    timesteps = torch.cat([scheduler.timesteps.float(), torch.zeros(1)])
    sampler = SamplerConfig(method="flow_sde", eta=cfg.flow_eta, log_prob_reduction="sum")  # the exact density
    chain = SamplingChain.build(scheduler, timesteps, sampler, shape[1:])
    k, batch = cfg.flow_step, shape[0]
    sigma, sigma_next = float(scheduler.sigmas[k]), float(scheduler.sigmas[k + 1])
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x = torch.randn(shape, generator=gen, device=device)
    v = torch.randn(shape, generator=gen, device=device)
    t, t_next = timesteps[k].expand(batch).to(device), timesteps[k + 1].expand(batch).to(device)
    ours = step_with_logprob(chain, k, v, x, generator=gen)
    prev = ours.prev_sample
    _, plain_lp, plain_mean, _ = plain_flow_sde_step(x, v, sigma, sigma_next, cfg.flow_eta, gen, prev)
    checks = {"max_abs_mean_diff_vs_plain": float((ours.mean - plain_mean).abs().max()),
              "max_rel_log_prob_diff_vs_plain": float(((ours.log_prob - plain_lp) / plain_lp.abs()).abs().max())}
    sampling = {
        "diffgrpo step_with_logprob": lambda: step_with_logprob(chain, k, v, x, generator=gen),
        "plain formula": lambda: plain_flow_sde_step(x, v, sigma, sigma_next, cfg.flow_eta, gen),
        "diffgrpo reverse_step (per-call tables)": lambda: reverse_step(
            scheduler, v, t, x, eta=cfg.flow_eta, generator=gen, next_timestep=t_next),
    }
    scoring = {
        "diffgrpo step_with_logprob": lambda: step_with_logprob(chain, k, v, x, prev_sample=prev),
        "plain formula": lambda: plain_flow_sde_step(x, v, sigma, sigma_next, cfg.flow_eta, gen, prev),
    }
    if cfg.flow_grpo_module is not None:
        flow_grpo_step = importlib.import_module(cfg.flow_grpo_module).sde_step_with_logprob
        fg_t = scheduler.timesteps[k].expand(batch).to(device)
        _, fg_lp, fg_mean, _ = flow_grpo_step(scheduler, v, fg_t, x, noise_level=cfg.flow_eta, prev_sample=prev)
        checks["max_abs_mean_diff_vs_flow_grpo"] = float((ours.mean - fg_mean).abs().max())
        dims = math.prod(shape[1:])  # flow_grpo averages over dimensions, diffgrpo sums by default
        checks["max_rel_log_prob_diff_vs_flow_grpo"] = float(((ours.log_prob / dims - fg_lp) / fg_lp.abs()).abs().max())
        sampling["flow_grpo sde_step_with_logprob"] = lambda: flow_grpo_step(
            scheduler, v, fg_t, x, noise_level=cfg.flow_eta, generator=gen)
        scoring["flow_grpo sde_step_with_logprob"] = lambda: flow_grpo_step(
            scheduler, v, fg_t, x, noise_level=cfg.flow_eta, prev_sample=prev)
    out = {"shape": list(shape), "checks": checks}
    for mode, contenders in (("sampling", sampling), ("scoring", scoring)):
        times, calls = _interleaved(contenders, cfg, device, reference="plain formula")
        ours_times = times["diffgrpo step_with_logprob"]
        out[mode] = {name: {"median_us": 1e6 * statistics.median(ts), "calls_per_round": calls,
                            "ratio_ours_over_this": _ratio_summary(ours_times, ts)} for name, ts in times.items()}
    return out


def _ratio_summary(ours: list[float], other: list[float]) -> dict:
    """Median, 10th and 90th percentile over rounds of ours / other (per round, both timed back to back)."""
    ratios = sorted(a / b for a, b in zip(ours, other, strict=True))
    pick = lambda q: ratios[min(len(ratios) - 1, int(q * len(ratios)))]
    return {"median": statistics.median(ratios), "p10": pick(0.1), "p90": pick(0.9)}


def per_call(cfg: Config) -> tuple[str, dict]:
    """The per-call table and its results (with the machine, its load before and after, and the settings)."""
    load_before = os.getloadavg()
    results = [per_call_shape(cfg, tuple(int(n) for n in spec.split(","))) for spec in cfg.per_call_shapes]
    record = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "flow_grpo_commit": cfg.flow_grpo_commit if cfg.flow_grpo_module else None, "shapes": results}
    return per_call_table(record), record


def per_call_table(record: dict) -> str:
    """Markdown: per shape and mode, each contender's median per-call time and diffgrpo's ratio to it."""
    cfg = record["config"]
    lines = [f"flow_sde step {cfg['flow_step']} of {cfg['flow_steps']} (shift 3), eta {cfg['flow_eta']}, "
             f"device={cfg['device']}, torch {record['torch']}, {record['torch_threads']} thread(s), "
             f"{cfg['rounds']} interleaved rounds of about {cfg['round_ms']:.0f} ms per contender, load average "
             f"{record['load_average_before'][0]:.1f} -> {record['load_average_after'][0]:.1f} "
             f"on {record['cpu_count']} cores", "",
             "| latents | mode | contender | median per call (us) | diffgrpo / contender (median, p10-p90) |",
             "|---|---|---|---:|---:|"]
    for r in record["shapes"]:
        for mode in ("sampling", "scoring"):
            for name, m in r[mode].items():
                q = m["ratio_ours_over_this"]
                ratio = "" if name.startswith("diffgrpo step") else f"{q['median']:.2f} ({q['p10']:.2f}-{q['p90']:.2f})"
                lines.append(f"| {'x'.join(map(str, r['shape']))} | {mode} | {name} | {m['median_us']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def batched_table(cfg: Config) -> str:
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
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> str:
    unknown = [s for s in cfg.sections if s not in ("batched", "per_call")]
    if unknown:
        raise ValueError(f"--sections {unknown} unknown; choose from batched, per_call")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    tables = []
    if "batched" in cfg.sections:
        tables.append(batched_table(cfg))
    if "per_call" in cfg.sections:
        table, record = per_call(cfg)
        tables.append(table)
        if cfg.json_output is not None:
            cfg.json_output.parent.mkdir(parents=True, exist_ok=True)
            cfg.json_output.write_text(json.dumps(record, indent=2) + "\n")
    text = "\n".join(tables)
    if cfg.output is not None:
        with cfg.output.open("a") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    print(main(tyro.cli(Config)))
