"""Run by tests/test_multiprocess_sync.py under `accelerate launch --multi_gpu --num_processes 2`.

Checkpoints of a model sharded over 2 CPU ranks (torch FSDP2 ``fully_shard`` on gloo; accelerate's
own FSDP mode refuses the CPU, see diffgrpo/checkpoint.py): train 3 steps, save, train 3 more;
then a fresh sharded model loads the checkpoint and trains the same 3 steps. Rank 0 writes the
full weights at the save and at both ends, and the weights the checkpoint holds.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from diffgrpo.checkpoint import load_checkpoint, save_checkpoint
from diffgrpo.launch import make_accelerator
from tests.toy_task import DIM, sharded_toy_net

out = Path(sys.argv[1])
accelerator = make_accelerator(out, log_with=None)
rank = accelerator.process_index


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = sharded_toy_net()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, optimizer, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
        x_t, cond = torch.randn(8, DIM, generator=gen), torch.randn(8, 1, generator=gen)
        loss = model(x_t, torch.full((8,), 500.0), cond).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every rank must call this (it gathers the shards); rank 0 gets the full tensors."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


model, optimizer = build()
train(model, optimizer, range(0, 3))
at_save = full_weights(model)
path = save_checkpoint(accelerator, out / "run", 3, model=model, optimizer=optimizer)
train(model, optimizer, range(3, 6))
straight = full_weights(model)

resumed, resumed_optimizer = build()
ckpt = load_checkpoint(accelerator, path, model=resumed, optimizer=resumed_optimizer)
train(resumed, resumed_optimizer, range(3, 6))
after_resume = full_weights(resumed)
if rank == 0:
    saved = {k[len("model."):]: v for k, v in load_file(str(path / "shared.safetensors")).items()
             if k.startswith("model.")}
    torch.save({"world": accelerator.num_processes, "at_save": at_save, "saved": saved, "straight": straight,
                "after_resume": after_resume, "step": ckpt.step}, out / "result.pt")
accelerator.wait_for_everyone()
