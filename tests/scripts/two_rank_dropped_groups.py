"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2`.

GRPO on the toy task with ``zero_std_policy="drop"`` and a reward that is constant for chosen
condition ids, so that whole micro-batches of chosen ranks fall out of the loss:

    one_rank   rank 0's last micro-batch is dropped every iteration, rank 1's is not
    both_ranks the last micro-batch of both ranks is dropped
    whole_rank every group of rank 1 is dropped (it contributes no loss term at all)

Usage: ``two_rank_dropped_groups.py OUT_DIR [SCENARIO ...]`` (default: all three). Each rank
writes ``OUT_DIR/<scenario>_rank<r>.pt`` with its final weights and its first loss mask.
"""

import dataclasses
import sys
from pathlib import Path

import torch

from diffgrpo.advantages import AdvantageConfig
from diffgrpo.config import GRPOConfig, OptimConfig
from diffgrpo.launch import make_accelerator
from diffgrpo.rewards import RewardSet, register_reward
from diffgrpo.rng import make_generator
from diffgrpo.stream import IndexStream
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask, toy_chain

SCENARIOS = ("one_rank", "both_ranks", "whole_rank")
CONDITIONS, GROUP, MICRO = 4, 4, 8  # 16 chains per rank: micro-batch 1 holds conditions 2 and 3


class IdToyTask(ToyTask):
    """The toy task with each example's index in the batch, for rewards keyed on condition ids."""

    def load_examples(self, split, indices):
        return {**super().load_examples(split, indices), "cond_id": indices.clone()}


def drawn_ids(cfg: GRPOConfig, rank: int, world: int) -> list[torch.Tensor]:
    """Condition ids rank ``rank`` draws in each iteration, as train_grpo draws them."""
    stream = IndexStream(IdToyTask().num_examples("train"), cfg.seed, rank, world)
    return [stream.next(cfg.conditions_per_iteration) for _ in range(cfg.num_iterations)]


def flat_ids(scenario: str, cfg: GRPOConfig, world: int) -> set[int]:
    last = CONDITIONS - MICRO // GROUP  # first condition of the last micro-batch
    per_rank = [drawn_ids(cfg, r, world) for r in range(world)]
    if scenario == "one_rank":
        return {int(i) for ids in per_rank[0] for i in ids[last:]}
    if scenario == "both_ranks":
        return {int(i) for rank_ids in per_rank for ids in rank_ids for i in ids[last:]}
    if scenario == "whole_rank":
        return {int(i) for ids in per_rank[1] for i in ids}
    raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")


def register_flat_reward(name: str, flat: set[int]) -> None:
    """Closeness to the target, but a constant 0.5 (a zero-std group) for conditions in ``flat``."""

    @register_reward(name)
    def _factory():
        def reward(decoded, batch):
            closeness = torch.exp(-(decoded["x0"] - batch["target"]).square().mean(-1))
            is_flat = torch.isin(batch["cond_id"], torch.tensor(sorted(flat), device=closeness.device))
            return torch.where(is_flat, torch.full_like(closeness, 0.5), closeness)

        return reward


out = Path(sys.argv[1])
scenarios = sys.argv[2:] or SCENARIOS
accelerator = make_accelerator(out, log_with=None)
rank, world = accelerator.process_index, accelerator.num_processes
task = IdToyTask("ddim")
for scenario in scenarios:
    base = GRPOConfig(num_iterations=2, conditions_per_iteration=CONDITIONS, group_size=GROUP,
                      micro_batch_size=MICRO, advantages=AdvantageConfig(zero_std_policy="drop"),
                      optim=OptimConfig(learning_rate=1e-2), checkpoint_every=0, rewards=("toy_closeness",))
    reward = f"toy_flat_{scenario}"
    register_flat_reward(reward, flat_ids(scenario, base, world))
    cfg = dataclasses.replace(base, rewards=(reward,))
    torch.manual_seed(0)
    model = ToyNet()
    # The first iteration's loss mask exactly as train_grpo computes it (to check the scenario).
    batch = batch_to(task.load_examples("train", drawn_ids(cfg, rank, world)[0]), accelerator.device)
    first = collect(task, model, toy_chain(task), batch, cfg=cfg, rewards=RewardSet.from_specs({reward: 1}),
                    perturber=make_perturber(cfg), generator=make_generator(cfg.seed, "rollout", rank),
                    group_id_offset=rank * cfg.conditions_per_iteration)
    history = train_grpo(task, model, cfg, accelerator=accelerator, output_dir=out / scenario)
    torch.save({"world": world, "mask": first.advantages.mask.cpu(), "history": history,
                "weights": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}},
               out / f"{scenario}_rank{rank}.pt")
