"""How much of a GRPO iteration is the library's own work, outside the network's passes?

One iteration (rollout, rewards, advantages, policy update) of the shapes task or of the
ego-motion task (demo prior, joint-level rewards) is timed as a whole, and separately the time
spent inside the network's forward passes (``task.predict``) and inside ``backward()``. The rest
(step densities, noise, decoding, rewards, advantages, optimiser, bookkeeping) is the overhead;
the goal is under 5 %.

    python recipes/benchmarks/bench_grpo_overhead.py [--task ego_motion] [--output docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch
from accelerate import Accelerator

from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig, OptimConfig, SamplerConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import parse_reward_specs
from tasks.shapes.model import ShapesModelConfig, build_model
from tasks.shapes.task import ShapesTask


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    @contextmanager
    def measure(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start


def make_task(name: str):
    """(task, model, sampling chain, rewards) for the benchmarked task."""
    if name == "shapes":
        task = ShapesTask()
        return task, build_model(ShapesModelConfig(), seed=0), SamplingChain.of(task, SamplerConfig(eta=0.7)), (
            "shapes_disc",)
    import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
    from tasks.ego_motion.model.network import load_denoiser
    from tasks.ego_motion.task import DEMO_PRIOR_PATH, EgoMotionTask

    task = EgoMotionTask()
    return task, load_denoiser(DEMO_PRIOR_PATH), task.sampling_chain(), ("ego_rot", "ego_pos", "ego_pa_pos", "ego_vel")


def run(task_name: str, iterations: int, conditions: int, group_size: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task, model, chain, reward_names = make_task(task_name)
    cfg = GRPOConfig(num_iterations=iterations, conditions_per_iteration=conditions, group_size=group_size,
                     micro_batch_size=conditions * group_size,
                     optim=OptimConfig(learning_rate=1e-5), rewards=reward_names)
    accelerator = Accelerator(cpu=True)
    optimizer, schedule = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    rewards = RewardSet.from_specs(parse_reward_specs(cfg.rewards))
    forward, backward = Timer(), Timer()
    predict = task.predict
    task.predict = lambda m, x, t, c: _timed(forward, predict, m, x, t, c)  # type: ignore[method-assign]
    accel_backward = accelerator.backward
    accelerator.backward = lambda loss: _timed(backward, accel_backward, loss)  # type: ignore[method-assign]
    generator = make_generator(0, "bench")
    totals = []
    for it in range(iterations + 1):  # the first iteration warms up and is not counted
        if it == 1:
            forward.seconds = backward.seconds = 0.0
        start = time.perf_counter()
        batch = task.load_examples("train", torch.arange(conditions) + it * conditions)
        data = collect(task, model, chain, batch, cfg=cfg, rewards=rewards, perturber=make_perturber(cfg),
                       generator=generator, group_id_offset=it * conditions)
        policy_update(task, model, chain, data, optimizer, cfg=cfg, generator=generator, accelerator=accelerator,
                      lr_scheduler=schedule)
        if it >= 1:
            totals.append(time.perf_counter() - start)
    total = sum(totals)
    outside = total - forward.seconds - backward.seconds
    return {"iteration_s": total / iterations, "forward_s": forward.seconds / iterations,
            "backward_s": backward.seconds / iterations, "outside_share": outside / total}


def _timed(timer: Timer, fn, *args):
    with timer.measure():
        return fn(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("shapes", "ego_motion"), default="shapes")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--conditions", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="append the markdown table to this file")
    args = parser.parse_args()
    r = run(args.task, args.iterations, args.conditions, args.group_size, args.threads)
    table = (
        f"| {args.task} GRPO iteration (B={args.conditions}, G={args.group_size}, CPU, {args.threads} threads) "
        "| time (s) |\n|---|---:|\n"
        f"| whole iteration | {r['iteration_s']:.3f} |\n| network forward passes | {r['forward_s']:.3f} |\n"
        f"| backward passes | {r['backward_s']:.3f} |\n"
        f"| **outside forward/backward** | **{r['iteration_s'] - r['forward_s'] - r['backward_s']:.3f} "
        f"({100 * r['outside_share']:.1f} %)** |\n"
    )
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
