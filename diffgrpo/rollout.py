"""Group rollouts: G stochastic sampling chains per condition that share their initial noise.

Why: GRPO compares samples *within* a group, so the members of a group must differ only through
the stochastic steps (and, optionally, a perturbed condition), never through x_T; and different
groups, on this process or on another, must not share noise (a classic multi-GPU bug). Groups
are identified by an explicit integer id, never by the content of their condition.

Every chain runs the same K steps; we record x_T..x_0, the log-probability of each step under
the sampling (old) policy, and the x0 predictions of the steps a task asks for (used by tasks for
hard negatives; ``diffgrpo.task.x0_pred_steps_of``). The condition may be a tensor or a dict of
tensors (e.g. prompt embeddings with their unconditional counterparts for guidance); it is sliced
row-wise with ``diffgrpo.task.select_rows`` into the same micro-batches when sampling and re-scoring.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from diffgrpo.config import SamplerConfig
from diffgrpo.sde import step_with_logprob
from diffgrpo.task import Cond, concat_rows, cond_device, cond_rows, select_rows

ModelFn = Callable[[Tensor, Tensor, Cond], Tensor]
"""(x_t (N, *S), t (N,), cond (N, ...) or named (N, ...) tensors) -> model output (N, *S)."""


@dataclass(frozen=True)
class Trajectory:
    """A batch of N = B x G sampling chains over K steps; sample shape S."""

    states: Tensor
    """(N, K+1, *S) x_T, ..., x_0 (the chain's states in sampling order)."""
    timesteps: Tensor
    """(K+1,) the timestep of each state; step k goes from timesteps[k] to timesteps[k+1]."""
    log_probs: Tensor
    """(N, K) float32 log pi_old(x_{k+1} | x_k, c); 0 for deterministic steps."""
    x0_preds: Tensor
    """(N, K', *S) the model's x0 estimate at the kept steps (``x0_pred_steps``; all K by default)."""
    is_stochastic: Tensor
    """(K,) bool: steps with std > 0; only these carry a density and enter the loss."""
    group_ids: Tensor
    """(N,) long: members of one group share an id and their initial noise."""
    cond: Cond
    """(N, ...) the model conditioning each chain used (after any perturbation): a tensor or named tensors."""
    step_stds: Tensor | None = None
    """(K,) the std of each step's Gaussian (0 for deterministic steps), for per-step loss weights."""
    x0_pred_steps: tuple[int, ...] | None = None
    """The steps (0 = the noisiest, ascending) whose x0 estimates ``x0_preds`` holds; None: every step."""

    @classmethod
    def concat(cls, parts: list[Trajectory]) -> Trajectory:
        """One trajectory of the chains of ``parts`` (rollout chunks over one chain), in order.

        The chunks must share the chain (timesteps, kept x0 steps); a step counts as stochastic only
        if it is in every chunk, and its std is the chunk stds' mean weighted by chain count.
        """
        first = parts[0]
        for part in parts[1:]:
            if not torch.equal(part.timesteps, first.timesteps) or part.x0_pred_steps != first.x0_pred_steps:
                raise ValueError("rollout chunks ran different chains (timesteps or kept x0 steps differ); "
                                 "they cannot form one trajectory")
        counts = torch.tensor([p.states.shape[0] for p in parts], dtype=torch.float32)
        stds = None
        if all(p.step_stds is not None for p in parts):
            stds = (torch.stack([p.step_stds for p in parts]) * counts[:, None]).sum(0) / counts.sum()
        return cls(
            states=torch.cat([p.states for p in parts]),
            timesteps=first.timesteps,
            log_probs=torch.cat([p.log_probs for p in parts]),
            x0_preds=torch.cat([p.x0_preds for p in parts]),
            is_stochastic=torch.stack([p.is_stochastic for p in parts]).all(0),
            group_ids=torch.cat([p.group_ids for p in parts]),
            cond=concat_rows([p.cond for p in parts]),
            step_stds=stds,
            x0_pred_steps=first.x0_pred_steps,
        )

    @property
    def samples(self) -> Tensor:
        """(N, *S) the final samples x_0."""
        return self.states[:, -1]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]


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


def group_ids_for(num_conditions: int, group_size: int, *, offset: int = 0, device=None) -> Tensor:
    """(B*G,) ids [o, o, ..., o+1, o+1, ...]: members of condition b get id offset + b.

    Use ``offset = (iteration * num_processes + process_index) * num_conditions`` for ids that are
    unique across processes and iterations.
    """
    return torch.arange(num_conditions, device=device).repeat_interleave(group_size) + offset


def shared_initial_noise(group_ids: Tensor, sample_shape: tuple[int, ...], generator: torch.Generator,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """x_T for every chain: one standard normal draw per distinct group id, copied to its members."""
    unique_ids, member_to_group = torch.unique(group_ids, return_inverse=True)
    noise = torch.randn((len(unique_ids), *sample_shape), generator=generator,
                        device=generator.device, dtype=dtype)  # (num_groups, *S)
    return noise[member_to_group.to(noise.device)]  # (N, *S)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def rollout(
    model_fn: ModelFn,
    scheduler,
    cond: Cond,
    group_ids: Tensor,
    timesteps: Tensor,
    sample_shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    sampler: SamplerConfig,
    micro_batch_size: int | None = None,
    step_generator: torch.Generator | None = None,
    x0_pred_steps: tuple[int, ...] | None = None,
) -> Trajectory:
    """Sample N chains (N = len(group_ids)) with group-shared initial noise.

    ``generator`` draws x_T, and the step noise too unless ``step_generator`` is given (named
    streams, see :class:`RandomStreams`). Step k is stochastic with ``sampler.eta_at(k)`` (0 outside
    ``sampler.sde_window``: a deterministic step with no density). ``micro_batch_size`` splits the N
    chains into fixed chunks for the network call; the policy update re-scores with the same chunks
    so that the network sees identical batches and the on-policy importance ratio is exactly 1.
    ``x0_pred_steps``: the steps whose x0 estimates are kept (Python indices, negatives count from the
    end; ``()`` keeps none); None keeps every step.
    """
    n = group_ids.shape[0]
    if cond_rows(cond) != n:
        raise ValueError(f"cond has {cond_rows(cond)} rows but group_ids has {n}; expand the conditions "
                         "to one row per group member (diffgrpo.task.repeat_batch) before rollout.")
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of K+1 >= 2 values, got shape {tuple(timesteps.shape)}")
    kept_x0 = resolve_steps(x0_pred_steps, len(timesteps) - 1)
    device = cond_device(cond)
    x = shared_initial_noise(group_ids, sample_shape, generator).to(device)
    subspace = sampler.exploration_subspace(sample_shape)
    step_generator = step_generator if step_generator is not None else generator
    states, log_probs, x0_preds, stochastic, stds = [x], [], [], [], []
    chunks = _chunks(n, micro_batch_size or n)
    for k in range(len(timesteps) - 1):
        t = timesteps[k].to(device).expand(n)
        t_next = timesteps[k + 1].to(device).expand(n)
        outputs = []
        for part in chunks:
            out = model_fn(x[part], t[part], select_rows(cond, part))
            outputs.append(step_with_logprob(
                scheduler, out, t[part], x[part], eta=sampler.eta_at(k), generator=step_generator,
                next_timestep=t_next[part], method=sampler.method,
                log_prob_reduction=sampler.log_prob_reduction,
                egoallo_denominator_offset=sampler.egoallo_denominator_offset, subspace=subspace,
            ))
        x = torch.cat([o.prev_sample for o in outputs]).to(x.dtype)
        states.append(x)
        log_probs.append(torch.cat([o.log_prob for o in outputs]))
        if kept_x0 is None or k in kept_x0:
            x0_preds.append(torch.cat([o.x0_pred for o in outputs]))
        stochastic.append(bool(torch.cat([o.is_stochastic for o in outputs]).all()))
        stds.append(float(torch.cat([o.std.reshape(-1) for o in outputs]).mean()))
    return Trajectory(
        states=torch.stack(states, dim=1),
        timesteps=timesteps.to(device),
        log_probs=torch.stack(log_probs, dim=1).float(),
        x0_preds=torch.stack(x0_preds, dim=1) if x0_preds else x.new_zeros((n, 0, *x.shape[1:])),
        is_stochastic=torch.tensor(stochastic, device=device),
        group_ids=group_ids.to(device),
        cond=cond,
        step_stds=torch.tensor(stds, dtype=torch.float32),
        x0_pred_steps=None if kept_x0 is None else tuple(sorted(kept_x0)),
    )


def resolve_steps(steps: tuple[int, ...] | None, num_steps: int) -> set[int] | None:
    """Python-style step indices (negatives from the end) -> a set in [0, K); None stays None."""
    if steps is None:
        return None
    bad = [k for k in steps if not -num_steps <= k < num_steps]
    if bad:
        raise ValueError(f"x0_pred_steps {bad} lie outside the chain's K={num_steps} steps; use indices in "
                         f"[-{num_steps}, {num_steps})")
    return {k % num_steps for k in steps}


def score_step(
    model_fn: ModelFn,
    scheduler,
    trajectory: Trajectory,
    step: int,
    rows: slice | Tensor,
    *,
    sampler: SamplerConfig,
):
    """Re-score step ``step`` of chains ``rows`` under the current model (with gradients).

    Returns the StepOutput whose ``log_prob`` (rows,) is log pi_theta(x_{k+1} | x_k, c) of the
    recorded transition. Pure in (x_k, t_k, t_{k+1}): no scheduler counters are touched.
    """
    x_t = trajectory.states[rows, step]
    n = x_t.shape[0]
    t = trajectory.timesteps[step].expand(n)
    t_next = trajectory.timesteps[step + 1].expand(n)
    out = model_fn(x_t, t, select_rows(trajectory.cond, rows))
    return step_with_logprob(
        scheduler, out, t, x_t, eta=sampler.eta_at(step), prev_sample=trajectory.states[rows, step + 1],
        next_timestep=t_next, method=sampler.method, log_prob_reduction=sampler.log_prob_reduction,
        egoallo_denominator_offset=sampler.egoallo_denominator_offset,
        subspace=sampler.exploration_subspace(tuple(x_t.shape[1:])),
    )


def check_sampler(scheduler, timesteps: Tensor, sampler: SamplerConfig, *,
                  eta_flag: str = "--grpo.sampler.eta") -> None:
    """Raise now, before any data or model work, if a step of the chain is undefined for ``sampler``.

    Why: an eta too large for the schedule (e.g. EgoAllo's step above ~0.97 on the ego-motion chain),
    a method of the wrong scheduler family or a timestep outside the scheduler's table would otherwise
    fail at the first rollout step, minutes into a run. Every step (t_k, t_{k+1}) is taken once on a
    one-element dummy sample with a zero model output: the same code path the rollout runs, so the
    same errors, at no cost. For an eta-dependent failure the message gives the largest eta that
    passes (to 1e-3) and names ``eta_flag``, the flag that sets it in the caller's recipe.
    """
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be a 1-D sequence of K+1 >= 2 values, got shape {tuple(timesteps.shape)}")
    num_steps = len(timesteps) - 1
    if sampler.sde_window is not None and sampler.sde_window[1] > num_steps:
        raise ValueError(f"sampler.sde_window={sampler.sde_window} ends after the chain's K={num_steps} steps; use "
                         f"0 <= START < END <= {num_steps}")
    if sampler.sde_window is not None and sampler.eta == 0:
        raise ValueError("sampler.sde_window is set but sampler.eta = 0, so no step is stochastic; raise eta")

    def first_error(eta: float) -> ValueError | None:
        zeros = torch.zeros(1, 1, dtype=torch.float64)
        for k in range(len(timesteps) - 1):
            if sampler.eta_at(k) == 0 and sampler.sde_window is not None:
                eta_k = 0.0  # outside the SDE window the step is deterministic whatever eta is
            else:
                eta_k = eta
            try:
                step_with_logprob(scheduler, zeros, timesteps[k], zeros, eta=eta_k, prev_sample=zeros,
                                  next_timestep=timesteps[k + 1], method=sampler.method,
                                  log_prob_reduction=sampler.log_prob_reduction,
                                  egoallo_denominator_offset=sampler.egoallo_denominator_offset)
            except ValueError as error:
                return ValueError(f"step {k} ({timesteps[k].item()} -> {timesteps[k + 1].item()}): {error}")
        return None

    error = first_error(sampler.eta)
    if error is None:
        return
    if sampler.eta > 0 and first_error(0.0) is None:
        low, high = 0.0, sampler.eta
        while high - low > 1e-3:
            mid = 0.5 * (low + high)
            low, high = (mid, high) if first_error(mid) is None else (low, mid)
        raise ValueError(f"sampler.eta={sampler.eta} is too large for method {sampler.method!r} on this schedule: "
                         f"valid range 0 <= eta <= {low:.3f}. Lower {eta_flag}. "
                         f"First failing {error}") from None
    raise error
