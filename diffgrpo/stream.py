"""A resumable, sharded stream of example indices.

Why: an exact resume must continue with the very conditions the uninterrupted run would have
drawn next, and processes must draw disjoint conditions. The stream is a pure function of
(seed, epoch, cursor): each epoch is a seeded permutation of the split, process r takes every
``num_processes``-th index of it, and the position is two integers saved in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffgrpo.rng import make_generator


@dataclass
class IndexStream:
    """Draws batches of indices into a split of ``num_examples`` examples, epoch after epoch."""

    num_examples: int
    seed: int
    process_index: int = 0
    num_processes: int = 1
    epoch: int = 0
    cursor: int = 0

    def __post_init__(self) -> None:
        if self.num_examples < self.num_processes:
            raise ValueError(f"the split has {self.num_examples} examples, fewer than the {self.num_processes} "
                             "processes: use fewer processes or a larger split")
        self._order = self._epoch_order()

    def _epoch_order(self) -> Tensor:
        perm = torch.randperm(self.num_examples, generator=make_generator(self.seed, "stream", self.epoch))
        return perm[self.process_index :: self.num_processes]

    def next(self, batch_size: int) -> Tensor:
        """The next ``batch_size`` indices (wrapping into a new epoch when this one runs out)."""
        taken: list[Tensor] = []
        need = batch_size
        while need > 0:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order()
            part = self._order[self.cursor : self.cursor + need]
            taken.append(part)
            self.cursor += len(part)
            need -= len(part)
        return torch.cat(taken)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()
