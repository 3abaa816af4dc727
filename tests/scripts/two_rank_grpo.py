"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2`.

Each rank runs two GRPO iterations of the toy task and writes what the test checks: its rank
layout, the initial noise and group ids of its first rollout, and its final weights.
"""

import sys
from pathlib import Path

import torch

from diffgrpo.config import GRPOConfig, OptimConfig
from diffgrpo.launch import make_accelerator
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.stream import IndexStream
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import train_grpo
from tests.toy_task import ToyNet, ToyTask, toy_chain

out = Path(sys.argv[1])
accelerator = make_accelerator(out, log_with=None)
rank, world = accelerator.process_index, accelerator.num_processes
cfg = GRPOConfig(num_iterations=2, conditions_per_iteration=3, group_size=4, rewards=("toy_closeness",),
                 optim=OptimConfig(learning_rate=1e-2), checkpoint_every=1)
task = ToyTask("ddim")
torch.manual_seed(0)
model = ToyNet()
# The first rollout exactly as train_grpo draws it.
stream = IndexStream(task.num_examples("train"), cfg.seed, rank, world)
batch = batch_to(task.load_examples("train", stream.next(cfg.conditions_per_iteration)), accelerator.device)
data = collect(task, model, toy_chain(task), batch, cfg=cfg, rewards=RewardSet.from_specs({"toy_closeness": 1}),
               perturber=make_perturber(cfg), generator=make_generator(cfg.seed, "rollout", rank),
               group_id_offset=rank * cfg.conditions_per_iteration)
train_grpo(task, model, cfg, accelerator=accelerator, output_dir=out / "run")
torch.save({"world": world, "x_T": data.trajectory.states[:, 0], "group_ids": data.trajectory.group_ids,
            "conditions": batch["condition"].flatten(),
            "weights": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}},
           out / f"rank{rank}.pt")
