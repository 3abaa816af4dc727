"""Rewards as plain registered callables, combined into named, weighted sub-rewards.

Why: GRPO needs several sub-rewards per sample, each normalised separately (docs/ego_motion_grpo.md)
and each watched in the logs against reward hacking. A reward is any callable

    reward(samples, batch) -> Tensor (N,) | Mapping[str, Tensor (N,)]

where `samples` holds the N generated samples (first axis N when it is a tensor) and `batch` is
whatever the task passes alongside them (conditions, ground truth, ...), typically a mapping.
Rewards are judged, not differentiated: they run under `torch.no_grad()`.

The registry maps a name to a *factory*: keyword parameters -> reward callable. It is the one
global the library allows: written at import, then read by name.

Naming: a reward `name` returning a tensor gives the sub-reward `name`; one returning a mapping
gives `name/<key>` for each key, every sub-reward carrying the reward's weight. `RewardSet` is
the one home for weights: pass `RewardOutput.weights` to `AdvantageConfig(weights=...)`, e.g.
`dataclasses.replace(adv_cfg, weights=out.weights)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from diffgrpo.registry import Registry, parse_assignments

Reward = Callable[[Any, Any], "Tensor | Mapping[str, Tensor]"]
RewardFactory = Callable[..., Reward]

_REWARDS: Registry[RewardFactory] = Registry("reward")


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Register `factory(**params) -> reward` under `name` (no '/', not already taken)."""
    if not name or "/" in name:
        raise ValueError(f"reward name {name!r} must be non-empty and contain no '/' (used for sub-rewards)")
    return _REWARDS.register(name)


def available_rewards() -> tuple[str, ...]:
    return _REWARDS.names()


def get_reward(name: str, **params: Any) -> Reward:
    """Build the reward registered as `name`. KeyError lists the known names; ValueError reports
    parameters the factory does not accept."""
    return _REWARDS.build(name, **params)


def reward_parameters(name: str) -> tuple[str, ...]:
    """The keyword parameters the factory of reward ``name`` takes (KeyError listing the known names)."""
    return _REWARDS.parameters(name)


def parse_reward_params(items: Iterable[str], flag: str = "--reward-params") -> dict[str, dict[str, Any]]:
    """``("REWARD.KEY=VALUE", ...)`` -> ``{REWARD: {KEY: VALUE}}``: factory parameters of registered rewards
    from the command line (e.g. ``ego_rot.omega=3``), each VALUE read as a Python literal (``parse_assignments``).

    Raises:
        ValueError: an item not of the form REWARD.KEY=VALUE, a key given twice, or a KEY the factory of REWARD
            does not take (the message lists the ones it does); KeyError: an unregistered REWARD.
    """
    grouped: dict[str, list[str]] = {}
    for item in items:
        name, dot, assignment = item.partition(".")
        if not dot or not name or "=" not in assignment:
            raise ValueError(f"{flag} {item!r}: write REWARD.KEY=VALUE, e.g. {flag} ego_rot.omega=3.0")
        grouped.setdefault(name, []).append(assignment)
    out = {}
    for name, assignments in grouped.items():
        params = parse_assignments(assignments, f"{flag} {name}.")
        unknown = sorted(set(params) - set(reward_parameters(name)))
        if unknown:
            raise ValueError(f"{flag}: reward {name!r} takes no parameter {', '.join(unknown)}; it takes "
                             f"{', '.join(reward_parameters(name)) or 'none'}")
        out[name] = params
    return out


def _mean_squared_error(samples: Tensor, batch: Mapping[str, Tensor], target_key: str) -> Tensor:
    """Mean over all non-sample dims of (samples - batch[target_key])^2, shape (N,)."""
    if target_key not in batch:
        raise KeyError(f"batch has no {target_key!r} entry (keys: {sorted(batch)}); set target_key")
    diff = samples - batch[target_key]
    return diff.reshape(diff.shape[0], -1).pow(2).mean(dim=1)


@register_reward("neg_mse")
def neg_mse(target_key: str = "target") -> Reward:
    """R = -mean((x - target)^2): closer to the task's target is better (units of x squared)."""

    def reward(samples: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return -_mean_squared_error(samples, batch, target_key)

    return reward


@register_reward("exp_neg_mse")
def exp_neg_mse(omega: float = 1.0, target_key: str = "target") -> Reward:
    """R = exp(-omega * mean((x - target)^2)) in (0, 1], the paper's squashing of an error;
    choose omega so that R spans a useful range at the start of post-training."""
    if not (math.isfinite(omega) and omega > 0):
        raise ValueError(f"omega={omega!r} must be finite and > 0")

    def reward(samples: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
        return torch.exp(-omega * _mean_squared_error(samples, batch, target_key))

    return reward


@dataclass(frozen=True)
class RewardSpec:
    """One configured reward: registry name, weight and factory parameters."""

    name: str
    weight: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"weight={self.weight!r} of reward {self.name!r} must be finite")


@dataclass(frozen=True)
class RewardOutput:
    """Validated sub-rewards of one batch, their weights and the weighted total."""

    components: dict[str, Float[Tensor, " N"]]
    """Sub-reward name -> (N,) values; see the module docstring for naming."""
    weights: dict[str, float]
    """Sub-reward name -> weight (pass to AdvantageConfig.weights)."""
    total: Float[Tensor, " N"]
    """sum_k weights[k] * components[k]."""


class RewardSet:
    """Several rewards called together, each validated, with per-reward weights.

    `submit` runs the same computation in a worker thread and returns a Future, so a slow or
    remote reward overlaps with other work (e.g. the next rollout); the worker pool is created
    on first use and released by `close()` or a `with` block.
    """

    def __init__(
        self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None, max_workers: int = 1
    ) -> None:
        if not rewards:
            raise ValueError("a RewardSet needs at least one reward")
        for name in rewards:
            if not name or "/" in name:
                raise ValueError(f"reward name {name!r} must be non-empty and contain no '/'")
        weights = dict.fromkeys(rewards, 1.0) if weights is None else dict(weights)
        if set(weights) != set(rewards):
            raise ValueError(f"weights have keys {sorted(weights)} but the rewards are {sorted(rewards)}")
        for name, w in weights.items():
            if not math.isfinite(w):
                raise ValueError(f"weight {w!r} of reward {name!r} must be finite")
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} must be >= 1")
        self.rewards = dict(rewards)
        self.weights = {name: float(weights[name]) for name in rewards}
        self._max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_specs(
        cls, specs: Mapping[str, float] | Iterable[RewardSpec | tuple], max_workers: int = 1
    ) -> RewardSet:
        """Build from the registry: `{name: weight}` or specs `RewardSpec` / `(name, weight[, params])`."""
        if isinstance(specs, Mapping):
            resolved = [RewardSpec(name, weight) for name, weight in specs.items()]
        else:
            resolved = [s if isinstance(s, RewardSpec) else RewardSpec(*s) for s in specs]
        names = [s.name for s in resolved]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names {names} repeat; each reward may appear once")
        rewards = {s.name: get_reward(s.name, **s.params) for s in resolved}
        return cls(rewards, {s.name: s.weight for s in resolved}, max_workers=max_workers)

    def __call__(self, samples: Any, batch: Any) -> RewardOutput:
        """Compute, flatten and validate every sub-reward, shape (N,) each, finite."""
        n = samples.shape[0] if isinstance(samples, Tensor) else None
        components: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        with torch.no_grad():
            for name, reward in self.rewards.items():
                value = reward(samples, batch)
                if isinstance(value, Mapping):
                    if not value:
                        raise ValueError(f"reward {name!r} returned an empty mapping; return >= 1 sub-reward")
                    parts = {f"{name}/{k}": v for k, v in value.items()}
                else:
                    parts = {name: value}
                for key, part in parts.items():
                    if key in components:
                        raise ValueError(f"sub-reward {key!r} is produced twice; rename a reward or its key")
                    n = _check_component(key, part, n)
                    components[key] = part
                    weights[key] = self.weights[name]
        dtype = torch.promote_types(next(iter(components.values())).dtype, torch.float32)
        total = sum(weights[k] * v.to(dtype) for k, v in components.items())
        return RewardOutput(components=components, weights=weights, total=total)

    def submit(self, samples: Any, batch: Any) -> Future[RewardOutput]:
        """Compute in a worker thread; `.result()` gives what `self(samples, batch)` returns.
        Do not modify `samples` or `batch` in place until the future is done."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="reward")
        return self._executor.submit(self, samples, batch)

    def close(self) -> None:
        """Wait for pending submissions and release the worker threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_component(key: str, value: Any, n: int | None) -> int:
    """Raise unless `value` is a finite real tensor (N,); returns N."""
    if not isinstance(value, Tensor) or value.ndim != 1 or (n is not None and value.shape[0] != n):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"reward {key!r} returned {shape}, expected a tensor of shape (N,) with N={n}")
    if not value.is_floating_point():
        raise ValueError(f"reward {key!r} returned dtype {value.dtype}, expected a floating tensor")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"reward {key!r} returned NaN or inf values")
    return value.shape[0]
