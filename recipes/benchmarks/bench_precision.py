"""Does bf16 mixed precision pay on this CPU? Rollout + update of the ego-motion main job, and the critic.

Three modes run side by side, interleaved round by round so that a load change on a shared
machine hits all of them alike, at ONE thread:

- ``fp32``: no autocast (``--grpo.mixed-precision no``);
- ``bf16``: bf16 autocast with PyTorch's bf16 attention kernels;
- ``bf16_fp32_attention``: bf16 autocast with q, k, v cast up to fp32 around attention
  (``diffgrpo.precision.scaled_dot_product_attention``, the CPU default).

Rollout + update is the main job's (``recipes/ego_motion.py``: demo prior, B = 8 head windows of 64
frames, G = 8, one micro-batch of 64 chains, K = 10 rollout steps, every stochastic step trained):
``collect`` (the denoiser's forward passes under no_grad, plus decoding and the joint-level
rewards) then ``policy_update`` (forward + backward per trained step, one optimiser step), from the
same weights in every round and mode. The critic line times the perceptual critic's scoring forward
(default size) on the 64 samples, and the matmul line one fp32 and one bf16 matrix product of the
denoiser's feed-forward size (does this CPU multiply bf16 faster?). Each ratio is fp32's time over
the mode's, taken per round; the table gives the median over rounds and the min-max spread.

    python recipes/benchmarks/bench_precision.py [--rounds 5] [--output docs/data/bench_precision.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from diffgrpo import precision
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import parse_reward_specs
from tasks.ego_motion.grpo import default_grpo

MODES = {"fp32": ("no", False), "bf16": ("bf16", False), "bf16_fp32_attention": ("bf16", True)}
"""mode -> (accelerate mixed_precision, attention in fp32 inside autocast)."""


def main_job_setup(rollout_steps: int):
    """(task, chain, model, cfg, rewards, batch) at the main job's default sizes."""
    import dataclasses

    import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
    from tasks.ego_motion.model.network import load_denoiser
    from tasks.ego_motion.task import DEMO_PRIOR_PATH, EgoMotionTask, EgoMotionTaskConfig

    grpo = default_grpo()
    task = EgoMotionTask(EgoMotionTaskConfig())
    cfg = dataclasses.replace(grpo, diagnostics_every=0)
    batch = task.load_examples(grpo.train_split, torch.arange(cfg.conditions_per_iteration))
    rewards = RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    return task, task.sampling_chain(rollout_steps), load_denoiser(DEMO_PRIOR_PATH), cfg, rewards, batch


@contextlib.contextmanager
def precision_mode(mode: str):
    """An Accelerator for ``mode`` with the attention policy patched as the mode asks."""
    mixed_precision, fp32_attention = MODES[mode]
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    with mock.patch.object(precision, "attention_in_float32", return_value=fp32_attention):
        yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


def time_rollout_update(setup, initial_state, mode: str, seed: int) -> tuple[float, float]:
    """Seconds of ``collect`` and of ``policy_update`` in ``mode`` from ``initial_state``."""
    task, chain, model, cfg, rewards, batch = setup
    model.load_state_dict(initial_state)
    optimizer, schedule = make_optimizer(model, cfg)
    with precision_mode(mode) as accelerator:
        start = time.perf_counter()
        data = collect(task, model, chain, batch, cfg=cfg, rewards=rewards, perturber=make_perturber(cfg),
                       generator=make_generator(seed, "bench"), group_id_offset=0, autocast=accelerator.autocast)
        middle = time.perf_counter()
        policy_update(task, model, chain, data, optimizer, cfg=cfg, generator=make_generator(seed, "select"),
                      accelerator=accelerator, lr_scheduler=schedule)
        end = time.perf_counter()
    return middle - start, end - middle


def critic_inputs(n: int, frames: int, gen: torch.Generator):
    """n random bodies (n, T, 22, 3) over the floor under a walking head (n, T+1, 4, 4)."""
    joints = torch.rand(n, frames, 22, 3, generator=gen) * torch.tensor([0.6, 0.6, 1.7])
    T_world_cpf = torch.eye(4).repeat(n, frames + 1, 1, 1)
    T_world_cpf[..., 0, 3] = torch.linspace(0.0, 2.0, frames + 1)
    T_world_cpf[..., 2, 3] = 1.6
    return joints, T_world_cpf


def time_critic(critic, inputs, mode: str) -> float:
    mixed_precision, fp32_attention = MODES[mode]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed_precision == "bf16")
    with mock.patch.object(precision, "attention_in_float32", return_value=fp32_attention), torch.no_grad(), autocast:
        start = time.perf_counter()
        critic(*inputs)
        return time.perf_counter() - start


def time_gemm(rows: int, width: int, hidden: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """Seconds of one (rows x width) @ (width x hidden) product in ``dtype``: the denoiser's
    feed-forward matrix product at the main job's sizes (64 chains x 65 tokens, W 128, FF 512)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, width, generator=gen).to(dtype), torch.randn(width, hidden, generator=gen).to(dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per mode: median seconds, and fp32-over-mode ratios per round (median, min, max)."""
    out = {}
    for mode, seconds in times.items():
        ratios = [a / b for a, b in zip(times["fp32"], seconds, strict=True)]
        out[mode] = {"median_s": statistics.median(seconds), "speedup_median": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)}
    return out


def markdown(results: dict) -> str:
    rows = [f"| part ({results['threads']} thread, {results['rounds']} interleaved rounds) | mode | median s | "
            "speed-up over fp32: median (min-max) |", "|---|---|---:|---|"]
    for part, label in (("rollout_update", "rollout + update"), ("rollout", "rollout (collect)"),
                        ("update", "update"), ("critic", "critic scoring forward"),
                        ("gemm", "feed-forward matmul 4160x128 @ 128x512")):
        for mode, s in results[part].items():
            rows.append(f"| {label} | {mode} | {s['median_s']:.3g} | {s['speedup_median']:.2f}x "
                        f"({s['speedup_min']:.2f}-{s['speedup_max']:.2f}) |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rollout-steps", type=int, default=10, help="the main job's --rollout-sampling-steps")
    parser.add_argument("--output", type=Path, default=None, help="write the results JSON here (and .md beside it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualModel

    setup = main_job_setup(args.rollout_steps)
    initial_state = {k: v.clone() for k, v in setup[2].state_dict().items()}
    torch.manual_seed(0)
    critic = PerceptualModel(PerceptualConfig()).eval()
    n = setup[3].conditions_per_iteration * setup[3].group_size
    inputs = critic_inputs(n, setup[0].cfg.window_frames, torch.Generator().manual_seed(0))
    print(f"load average before: {os.getloadavg()}", flush=True)
    for mode in MODES:  # warm-up: first calls allocate and pick kernels
        time_rollout_update(setup, initial_state, mode, seed=0)
        time_critic(critic, inputs, mode)
    parts: dict[str, dict[str, list[float]]] = {p: {m: [] for m in MODES} for p in ("rollout", "update", "critic")}
    parts["gemm"] = {"fp32": [], "bf16": []}
    frames, width = setup[0].cfg.window_frames, setup[2].config.width
    for r in range(args.rounds):
        for mode in MODES:
            rollout_s, update_s = time_rollout_update(setup, initial_state, mode, seed=1 + r)
            parts["rollout"][mode].append(rollout_s)
            parts["update"][mode].append(update_s)
            parts["critic"][mode].append(time_critic(critic, inputs, mode))
        for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            parts["gemm"][mode].append(time_gemm(n * (frames + 1), width, 4 * width, dtype))
        print(f"round {r + 1}: " + ", ".join(f"{m} {parts['rollout'][m][-1] + parts['update'][m][-1]:.2f} s"
                                             for m in MODES), flush=True)
    combined = {m: [a + b for a, b in zip(parts["rollout"][m], parts["update"][m], strict=True)] for m in MODES}
    results = {
        "threads": torch.get_num_threads(), "rounds": args.rounds, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": precision.cpu_has_native_bf16(), "amx_bf16": precision.cpu_bf16_pays(),
        "auto_resolves_to": precision.resolve_mixed_precision("auto", "cpu"),
        "load_average_at_end": list(os.getloadavg()),
        "sizes": {"conditions": setup[3].conditions_per_iteration, "group_size": setup[3].group_size,
                  "window_frames": setup[0].cfg.window_frames, "rollout_steps": args.rollout_steps},
        "rollout_update": summary(combined), "rollout": summary(parts["rollout"]),
        "update": summary(parts["update"]), "critic": summary(parts["critic"]), "gemm": summary(parts["gemm"]),
        "raw_seconds": parts,
    }
    table = markdown(results)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
