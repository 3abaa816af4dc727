"""Run by tests/test_finite_update.py under `accelerate launch --multi_gpu --num_processes 2`.

A model sharded over 2 CPU ranks (torch FSDP2 ``fully_shard`` on gloo): each rank holds part of each
gradient and weight, so a non-finite entry is seen by one rank only. (1) An inf put into rank 1's shard
of one gradient: both ranks must skip the step (the decision is all-reduced; a rank stepping alone
would desynchronise the replicas and the collectives). (2) A NaN put into rank 1's shard of one weight:
``save_checkpoint`` must refuse on both ranks and write nothing (rank 0 alone raising would leave rank 1
waiting). Every rank writes what it saw.
"""

import sys
from pathlib import Path

import torch

from diffgrpo.checkpoint import CheckpointError, save_checkpoint
from diffgrpo.finite_update import FiniteUpdateGuard
from diffgrpo.launch import make_accelerator
from tests.toy_task import DIM, sharded_toy_net

out = Path(sys.argv[1])
accelerator = make_accelerator(out, log_with=None)
rank = accelerator.process_index
model = sharded_toy_net()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
first = next(p for p in model.parameters())

loss = model(torch.randn(8, DIM), torch.full((8,), 500.0), torch.randn(8, 1)).square().mean()
loss.backward()
if rank == 1:
    first.grad.to_local().view(-1)[0] = float("inf")  # this rank's shard only
guard = FiniteUpdateGuard()
allowed = guard.allow_step(accelerator, model, [loss.detach()], where="two-rank test")

with torch.no_grad():
    if rank == 1:
        first.to_local().view(-1)[0] = float("nan")
try:
    save_checkpoint(accelerator, out / "run", 1, model=model, optimizer=optimizer)
    save_error = ""
except CheckpointError as error:
    save_error = str(error)
accelerator.wait_for_everyone()  # both ranks reach this: no rank is left in a collective
torch.save({"allowed": allowed, "skipped": guard.skipped, "save_error": save_error,
            "written": sorted(p.name for p in (out / "run").rglob("*"))}, out / f"rank{rank}.pt")
