"""Every random draw of diffgrpo comes from an explicit, named, seeded generator.

Why a module of its own: seeding is shared by the rollout, the probe, the evaluation, the perturbers
and the recipes; a run is reproducible, and resumable bit for bit, only if each of them draws from a
generator derived from (seed, purpose, process) and saved in checkpoints, never from torch's global one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch
from torch import Tensor


def make_generator(seed: int, *stream: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from (seed, *stream), e.g. (seed, "rollout", process_index).

    Why: every random draw in diffgrpo comes from an explicit generator, so runs are reproducible
    and processes get independent streams by passing their index.
    """
    key = ":".join(str(part) for part in (seed, *stream)).encode()
    derived = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(derived)
    return generator


@dataclass
class RandomStreams:
    """One generator per source of randomness in an iteration, so ablation variants share their draws.

    Why named streams: with one generator, turning the condition perturbation on consumes draws and
    so changes every initial noise and step noise after it; a variant would then differ from its
    baseline by its noise as well as by its setting. With a stream per purpose, two variants seeded
    alike draw identical initial and step noise whatever the other settings are (common random
    numbers), and each stream's state is saved per rank for an exact resume.
    """

    perturbation: torch.Generator
    """Condition perturbation of each group member (``perturb.py``)."""
    initial_noise: torch.Generator
    """x_T of each group."""
    step_noise: torch.Generator
    """The Gaussian draw of every stochastic step."""
    step_selection: torch.Generator
    """Which steps are trained (``loss.select_steps``)."""
    minibatch_order: torch.Generator
    """How the update's terms are shuffled into minibatches."""

    @classmethod
    def from_seed(cls, seed: int, process_index: int = 0, device: torch.device | str = "cpu") -> RandomStreams:
        """Independent streams seeded from (seed, "rollout", name, process_index)."""
        return cls(**{f.name: make_generator(seed, "rollout", f.name, process_index, device=device)
                      for f in fields(cls)})

    @classmethod
    def shared(cls, generator: torch.Generator) -> RandomStreams:
        """Every purpose draws from the one ``generator`` (the behaviour of a single-generator call)."""
        return cls(**{f.name: generator for f in fields(cls)})

    def get_state(self) -> dict[str, Tensor]:
        """{"stream.<name>": generator state} for a checkpoint's per-rank tensors."""
        return {f"stream.{f.name}": getattr(self, f.name).get_state() for f in fields(self)}

    def set_state(self, states: dict[str, Tensor]) -> None:
        """Restore from :meth:`get_state` output; raises naming any missing stream."""
        missing = [f.name for f in fields(self) if f"stream.{f.name}" not in states]
        if missing:
            raise KeyError(f"checkpoint has no state for random stream(s) {missing} (written by an older diffgrpo "
                           "with a single rollout generator?); restart the run without --resume.")
        for f in fields(self):
            getattr(self, f.name).set_state(states[f"stream.{f.name}"])


def as_streams(generator: torch.Generator | RandomStreams) -> RandomStreams:
    """A RandomStreams from either named streams or one generator shared by every purpose."""
    return generator if isinstance(generator, RandomStreams) else RandomStreams.shared(generator)
