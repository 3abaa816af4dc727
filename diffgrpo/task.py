"""The `Task` protocol: everything a conditioned diffusion task hands to the GRPO core.

Why a protocol: the core (rollouts, advantages, loss, checkpoints) is the same for every task;
what differs is the data, the network call, how a raw condition becomes model input and how a
sample is scored. A new task is then a thin adapter of a few methods, not a copied pipeline.

Conventions
- A *batch* is a ``dict[str, Tensor]`` whose tensors all share the leading batch axis; it holds
  the raw (perturbable) condition, the targets and anything the rewards or metrics need.
- The *raw condition* is a tensor ``(B, T, D)``: T along which perturbation noise is smooth
  (time for trajectories, a single step for static conditions), D channels. The core perturbs
  it per group member and the task re-encodes it with :meth:`Task.encode_condition`.
- The network predicts whatever ``scheduler.config.prediction_type`` says (epsilon, sample,
  v_prediction) or, for flow matching, the velocity.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]


@runtime_checkable
class Task(Protocol):
    """What a task plugin implements. See ``tasks/shapes`` for a complete small example."""

    sample_shape: tuple[int, ...]
    """Shape of one sample x_0 without the batch axis, e.g. (1, 16, 16) or (128, 226)."""

    def make_scheduler(self) -> Any:
        """A configured diffusers scheduler (DDIM/DDPM family or FlowMatchEulerDiscrete)."""
        ...

    def sampling_timesteps(self) -> Tensor:
        """The K+1 timesteps of the sampling chain, from the noisiest to the final one (K steps)."""
        ...

    def num_examples(self, split: str) -> int:
        """How many conditions the split holds ("train" or "test")."""
        ...

    def load_examples(self, split: str, indices: Tensor) -> Batch:
        """The examples at ``indices`` (B,) of ``split`` as a batch."""
        ...

    def raw_condition(self, batch: Batch) -> Tensor:
        """The perturbable condition (B, T, D) of a batch."""
        ...

    def with_raw_condition(self, batch: Batch, raw: Tensor) -> Batch:
        """A copy of ``batch`` whose raw condition is replaced by ``raw`` (after perturbation)."""
        ...

    def encode_condition(self, batch: Batch) -> Tensor:
        """Model conditioning computed from the batch's (possibly perturbed) raw condition."""
        ...

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Network output for noisy samples x_t (N, *sample_shape) at timesteps t (N,)."""
        ...

    def decode(self, x0: Tensor, batch: Batch) -> Mapping[str, Tensor]:
        """Turn final samples (N, *sample_shape) into task outputs the rewards and metrics read."""
        ...

    def evaluate(self, decoded: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Held-out metrics, one value per sample (N,) each, named with their unit."""
        ...


def repeat_batch(batch: Batch, group_size: int) -> Batch:
    """Repeat every example ``group_size`` times along the batch axis: [a, b] -> [a, a, b, b]."""
    return {key: value.repeat_interleave(group_size, dim=0) for key, value in batch.items()}


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return {key: value.to(device) for key, value in batch.items()}
