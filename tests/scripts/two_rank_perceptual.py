"""Run by tests/test_multiprocess_sync.py under `accelerate launch --multi_gpu --num_processes 2`.

Each rank trains the perceptual model for a few steps on its own random batch (different on
every rank), writes the perceptual model's and its optimiser's state, then knocks its replica out of step
on rank 1 only and records whether the next step notices.
"""

import sys
from pathlib import Path

import torch

from diffgrpo.launch import make_accelerator
from tasks.ego_motion.rewards.perceptual import PerceptualConfig, PerceptualTrainer

out = Path(sys.argv[1])
accelerator = make_accelerator(out, log_with=None)
rank, world = accelerator.process_index, accelerator.num_processes
config = PerceptualConfig(width=16, num_heads=2, num_blocks=1, ff_dim=16, learning_rate=1e-2, seed=0)
trainer = PerceptualTrainer(config, device=accelerator.device, accelerator=accelerator)

B, M, T = 2, 2, 6
gen = torch.Generator().manual_seed(100 + rank)  # a different batch on every rank
T_world_cpf = torch.eye(4).repeat(B, T + 1, 1, 1)
T_world_cpf[..., :3, 3] = torch.randn(B, T + 1, 3, generator=gen) * 0.1 + torch.tensor([0.0, 0.0, 1.6])
joints = torch.randn(B, T, 22, 3, generator=gen) * 0.3
negatives = joints[:, None] + torch.randn(B, M, T, 22, 3, generator=gen) * 0.05
initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
losses = [trainer.train_step(joints, T_world_cpf, negatives)["loss"] for _ in range(3)]
state = trainer.state_dict()

with torch.no_grad():  # a replica that drifted: the next step must refuse to go on, on every rank
    if rank == 1:
        next(trainer.model.parameters()).add_(1e-3)
try:
    trainer.train_step(joints, T_world_cpf, negatives)
    drift_error = ""
except RuntimeError as err:
    drift_error = str(err)
torch.save({"world": world, "initial": initial, "state": state.tensors, "losses": losses,
            "drift_error": drift_error}, out / f"rank{rank}.pt")
# both ranks saved; then an orderly teardown (exiting with the process group alive once aborted a rank at exit:
# "terminate called without an active exception")
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
