"""Held-out evaluation: one seeded sample per condition, the task's metrics per example.

Why seeded: base and post-trained models are compared on the same conditions *and* the same
noise, so the difference between them is the training, not the draw.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffgrpo.chain import SamplingChain
from diffgrpo.guidance import guided_model_fn
from diffgrpo.modes import evaluation_mode
from diffgrpo.rng import make_generator
from diffgrpo.rollout import rollout
from diffgrpo.task import Task, batch_to


@torch.no_grad()
def evaluate(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    *,
    split: str = "test",
    seed: int,
    batch_size: int = 32,
    max_examples: int | None = None,
    accelerator=None,
    autocast=contextlib.nullcontext,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per-example metrics (num_examples,) for ``split``, gathered over processes.

    Process r of P evaluates examples r, r + P, ... in batches of ``batch_size``; a batch's noise
    comes from a generator seeded by (seed, its first example index). The draw therefore depends
    on batch size and process count: compare models evaluated with the same settings.
    """
    n_total = task.num_examples(split) if max_examples is None else min(max_examples, task.num_examples(split))
    if n_total < 1:
        raise ValueError(f"evaluate got an empty batch: split {split!r} holds {task.num_examples(split)} examples "
                         f"and max_examples={max_examples}; evaluate a split with examples and max_examples >= 1")
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    indices = torch.arange(rank, n_total, world)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    with evaluation_mode(model):
        per_metric: dict[str, list[Tensor]] = {}
        batches = indices.split(batch_size)
        for idx in tqdm(batches, desc=f"eval {split}", disable=not progress or rank != 0, leave=False):
            batch = batch_to(task.load_examples(split, idx), device)
            cond = task.encode_condition(batch)
            gen = make_generator(seed, "eval", int(idx[0]), device=device)
            with autocast():
                traj = rollout(guided_model_fn(task.predict, model, chain.sampler.guidance_scale), chain, cond,
                               idx.to(device), generator=gen, x0_pred_steps=())
            decoded = task.decode(traj.samples, batch)
            for name, value in task.evaluate(decoded, batch).items():
                per_metric.setdefault(name, []).append(value.float())
    out = {name: torch.cat(values) for name, values in per_metric.items()}
    if accelerator is not None and world > 1:
        out = {name: accelerator.gather_for_metrics(value) for name, value in out.items()}
    return out
