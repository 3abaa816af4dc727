"""Run by tests/test_multiprocess.py under `accelerate launch --multi_gpu --num_processes 2`.

Each rank runs two GRPO iterations of the toy task and writes what the test checks: its rank
layout, the initial noise and group ids of its first rollout, and its final weights.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy_task import ToyNet, ToyTask  # noqa: E402

from diffgrpo.config import GRPOConfig, OptimConfig  # noqa: E402
from diffgrpo.launch import make_accelerator  # noqa: E402
from diffgrpo.rewards import RewardSet  # noqa: E402
from diffgrpo.rollout import make_generator  # noqa: E402
from diffgrpo.stream import IndexStream  # noqa: E402
from diffgrpo.task import batch_to  # noqa: E402
from diffgrpo.train_step import collect, make_perturber  # noqa: E402
from diffgrpo.trainer import train_grpo  # noqa: E402

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
data = collect(task, model, task.make_scheduler(), batch, cfg=cfg, rewards=RewardSet.from_specs({"toy_closeness": 1}),
               perturber=make_perturber(cfg), generator=make_generator(cfg.seed, "rollout", rank),
               group_id_offset=rank * cfg.conditions_per_iteration)
train_grpo(task, model, cfg, accelerator=accelerator, output_dir=out / "run")
torch.save({"world": world, "x_T": data.trajectory.states[:, 0], "group_ids": data.trajectory.group_ids,
            "conditions": batch["condition"].flatten(),
            "weights": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}},
           out / f"rank{rank}.pt")
