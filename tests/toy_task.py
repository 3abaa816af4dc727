"""A tiny conditioned diffusion task for the core's tests: 4-D samples whose target is c * 1.

Small enough to run dozens of GRPO iterations in a second, real enough to exercise every
piece: a diffusers scheduler, a network, a raw perturbable condition, a registered reward.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.config import SamplerConfig
from diffgrpo.rewards import available_rewards, register_reward

DIM = 4

if "toy_closeness" not in available_rewards():

    @register_reward("toy_closeness")
    def _toy_closeness(omega: float = 1.0):
        """exp(-omega * mean squared distance of x0 to the target c * 1), plus its two halves."""

        def reward(decoded, batch):
            err = (decoded["x0"] - batch["target"]).square()
            return {"all": torch.exp(-omega * err.mean(-1)), "first_half": -err[:, : DIM // 2].mean(-1)}

        return reward


class ToyNet(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, DIM))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.net(torch.cat([x_t, t[:, None].float() / 1000.0, cond], dim=-1))


class ToyTask:
    """Implements diffgrpo.task.Task for ``scheduler_kind`` in {"ddim", "ddpm", "flow"}."""

    sample_shape = (DIM,)

    def __init__(self, scheduler_kind: str = "ddim", num_steps: int = 6, seed: int = 0) -> None:
        self.scheduler_kind = scheduler_kind
        self.num_steps = num_steps
        gen = torch.Generator().manual_seed(seed)
        self._c = {"train": torch.rand(64, generator=gen) * 2 - 1, "test": torch.rand(16, generator=gen) * 2 - 1}

    def make_scheduler(self):
        if self.scheduler_kind == "ddim":
            s = DDIMScheduler(num_train_timesteps=1000)
        elif self.scheduler_kind == "ddpm":
            s = DDPMScheduler(num_train_timesteps=1000)
        else:
            s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        s.set_timesteps(self.num_steps)
        return s

    def sampling_timesteps(self) -> Tensor:
        s = self.make_scheduler()
        if self.scheduler_kind == "flow":
            return torch.cat([s.timesteps, torch.zeros(1)])
        return torch.cat([s.timesteps, torch.tensor([-1])])

    def num_examples(self, split: str) -> int:
        return len(self._c[split])

    def load_examples(self, split: str, indices: Tensor) -> dict[str, Tensor]:
        c = self._c[split][indices]
        return {"condition": c[:, None, None], "target": c[:, None].expand(-1, DIM).clone()}

    def raw_condition(self, batch):
        return batch["condition"]

    def with_raw_condition(self, batch, raw):
        return {**batch, "condition": raw}

    def encode_condition(self, batch) -> Tensor:
        return batch["condition"][:, 0, :]  # (N, 1)

    def predict(self, model, x_t, t, cond):
        return model(x_t, t, cond)

    def decode(self, x0, batch):
        return {"x0": x0}

    def evaluate(self, decoded, batch):
        return {"mse": (decoded["x0"] - batch["target"]).square().mean(-1)}


def toy_chain(task, **sampler) -> SamplingChain:
    """The sampling chain of ``task`` with ``SamplerConfig(**sampler)`` (the defaults: DDIM/flow, eta 1)."""
    return SamplingChain.of(task, SamplerConfig(**sampler))


def sharded_toy_net(seed: int = 0) -> ToyNet:
    """A seeded ToyNet sharded over the running processes with torch FSDP2 (``fully_shard`` per linear layer,
    then the whole net), for the multi-process checkpoint and update scripts."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = ToyNet()
    for layer in model.net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model
