"""The `Task` protocol: everything a conditioned diffusion task hands to the GRPO core.

Why a protocol: the core (rollouts, advantages, loss, checkpoints) is the same for every task;
what differs is the data, the network call, how a raw condition becomes model input and how a
sample is scored. A new task is then a thin adapter of a few methods, not a copied pipeline.

Conventions
- A *batch* is a ``dict[str, Tensor | list[str]]`` whose values all share the leading batch axis
  (a list of strings, e.g. text prompts, counts as one row per string); it holds the raw
  (perturbable) condition, the targets and anything the rewards or metrics need. The helpers
  below (:func:`repeat_batch`, :func:`batch_to`, :func:`select_rows`, :func:`concat_rows`) treat
  both kinds alike; tensors move between devices, strings stay as they are.
- A *condition* (what :meth:`Task.encode_condition` returns and :meth:`Task.predict` receives) is a
  tensor (N, ...) or a ``dict[str, Tensor]`` of them sharing the leading axis. Keys named
  ``negative_<key>`` hold the unconditional counterpart of ``<key>`` for classifier-free guidance
  (diffusers' naming, e.g. ``negative_prompt_embeds``); see ``diffgrpo.guidance``.
- The *raw condition* is a tensor ``(B, T, D)``: T along which perturbation noise is smooth
  (time for trajectories, a single step for static conditions), D channels. The core perturbs
  it per group member and the task re-encodes it with :meth:`Task.encode_condition`.
- The network predicts whatever ``scheduler.config.prediction_type`` says (epsilon, sample,
  v_prediction) or, for flow matching, the velocity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor | list[str]]
"""Examples sharing the leading axis: tensors (B, ...) and lists of B strings."""
Cond = Tensor | dict[str, Tensor]
"""Model conditioning: a tensor (N, ...) or named tensors (N, ...) each (``negative_*`` for guidance)."""


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

    def encode_condition(self, batch: Batch) -> Cond:
        """Model conditioning computed from the batch's (possibly perturbed) raw condition: a tensor or
        named tensors, each (N, ...); add ``negative_<key>`` entries to allow classifier-free guidance."""
        ...

    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Network output for noisy samples x_t (N, *sample_shape) at timesteps t (N,).

        Only call ``model(...)`` here: the core may pass the policy wrapped for distribution, or its
        reference (``diffgrpo.lora.AdapterDisabledReference``), which have no other attributes."""
        ...

    def decode(self, x0: Tensor, batch: Batch) -> Mapping[str, Tensor]:
        """Turn final samples (N, *sample_shape) into task outputs the rewards and metrics read."""
        ...

    def evaluate(self, decoded: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Held-out metrics, one value per sample (N,) each, named with their unit."""
        ...


X0_PRED_STEPS_ATTRIBUTE = "x0_pred_steps"
"""Optional task attribute: the sampling steps whose x0 predictions rollouts keep (see :func:`x0_pred_steps_of`)."""


def x0_pred_steps_of(task: object) -> tuple[int, ...] | None:
    """The steps whose x0 predictions a task's rollouts keep: its optional ``x0_pred_steps`` attribute.

    Why: a trajectory stores x_T..x_0 (needed for re-scoring) and, per kept step, the model's x0
    estimate; for images (N x K latents) keeping every step's estimate doubles the rollout's memory
    for nothing when no one reads them. A task sets ``x0_pred_steps = ()`` to keep none, or e.g.
    ``(-3, -2, -1)`` for the last three (indices as in Python, 0 = the noisiest step). Without the
    attribute every step is kept (None), as before.
    """
    steps = getattr(task, X0_PRED_STEPS_ATTRIBUTE, None)
    return None if steps is None else tuple(int(k) for k in steps)


def batch_size(batch: Batch) -> int:
    """The common leading size B of a batch's values; raises naming the keys when they disagree."""
    sizes = {key: (value.shape[0] if isinstance(value, Tensor) else len(value)) for key, value in batch.items()}
    if not sizes:
        raise ValueError("the batch is empty; load_examples must return at least one entry")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch entries disagree on the batch size: {sizes}; every tensor and list must have "
                         "one row per example")
    return next(iter(sizes.values()))


def _check_value(key: str, value: object) -> None:
    if not isinstance(value, Tensor) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise TypeError(f"batch entry {key!r} is a {type(value).__name__}; a batch holds tensors and lists of "
                        "strings only (convert it in the task's load_examples)")


def repeat_batch(batch: Batch, group_size: int) -> Batch:
    """Repeat every example ``group_size`` times along the batch axis: [a, b] -> [a, a, b, b]."""
    out: Batch = {}
    for key, value in batch.items():
        _check_value(key, value)
        out[key] = (value.repeat_interleave(group_size, dim=0) if isinstance(value, Tensor)
                    else [v for v in value for _ in range(group_size)])
    return out


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """Move every tensor of a batch to ``device`` (lists of strings are kept as they are)."""
    out: Batch = {}
    for key, value in batch.items():
        _check_value(key, value)
        out[key] = value.to(device) if isinstance(value, Tensor) else value
    return out


def select_rows(value, rows: slice | Sequence[int] | Tensor):
    """Rows of a tensor, a list of strings, or every entry of a batch or condition dict.

    ``rows``: a slice or integer indices (N',). Why one helper: the core slices conditions into
    micro-batches and rollout chunks; a dict condition (prompt embeddings and their unconditional
    counterparts) must be sliced entry by entry, identically, or guidance would pair the wrong rows.
    """
    if isinstance(value, Tensor):
        return value[rows]
    if isinstance(value, Mapping):
        return {key: select_rows(entry, rows) for key, entry in value.items()}
    if isinstance(value, list):
        if isinstance(rows, slice):
            return value[rows]
        return [value[int(i)] for i in torch.as_tensor(rows).reshape(-1).tolist()]
    raise TypeError(f"cannot select rows of a {type(value).__name__}; expected a tensor, a list or a dict of them")


def concat_rows(parts: Sequence):
    """Inverse of :func:`select_rows` over consecutive row ranges: tensors, lists or dicts of them."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {key: concat_rows([part[key] for part in parts]) for key in first}
    if isinstance(first, list):
        return [v for part in parts for v in part]
    raise TypeError(f"cannot concatenate {type(first).__name__} rows; expected a tensor, a list or a dict of them")


def cond_rows(cond: Cond) -> int:
    """N: the leading size of a condition (a tensor or named tensors that must agree)."""
    if isinstance(cond, Tensor):
        return cond.shape[0]
    sizes = {key: value.shape[0] for key, value in cond.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"condition entries disagree on the number of rows (or there are none): {sizes}; "
                         "encode_condition must return one row per sample in every entry")
    return next(iter(sizes.values()))


def cond_device(cond: Cond) -> torch.device:
    """The device of a condition (its first tensor's)."""
    return cond.device if isinstance(cond, Tensor) else next(iter(cond.values())).device
