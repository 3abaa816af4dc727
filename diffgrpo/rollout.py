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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffgrpo.chain import SamplingChain, step_with_logprob
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
    chain: SamplingChain,
    cond: Cond,
    group_ids: Tensor,
    *,
    generator: torch.Generator,
    micro_batch_size: int | None = None,
    step_generator: torch.Generator | None = None,
    x0_pred_steps: tuple[int, ...] | None = None,
) -> Trajectory:
    """Sample N chains (N = len(group_ids)) of ``chain`` (samples shaped ``chain.sample_shape``) with
    group-shared initial noise.

    ``generator`` draws x_T, and the step noise too unless ``step_generator`` is given (named
    streams, see :class:`diffgrpo.rng.RandomStreams`). Step k is stochastic with ``chain.sampler.eta_at(k)`` (0
    outside ``sampler.sde_window``: a deterministic step with no density). ``micro_batch_size`` splits
    the N chains into fixed chunks for the network call; the policy update re-scores with the same
    chunks so that the network sees identical batches and the on-policy importance ratio is exactly 1.
    ``x0_pred_steps``: the steps whose x0 estimates are kept (Python indices, negatives count from the
    end; ``()`` keeps none); None keeps every step.
    """
    n = group_ids.shape[0]
    if n == 0:
        raise ValueError("rollout got an empty batch: cond and group_ids hold 0 chains; pass at least one condition")
    if cond_rows(cond) != n:
        raise ValueError(f"cond has {cond_rows(cond)} rows but group_ids has {n}; expand the conditions "
                         "to one row per group member (diffgrpo.task.repeat_batch) before rollout.")
    kept_x0 = resolve_steps(x0_pred_steps, chain.num_steps)
    device = cond_device(cond)
    x = shared_initial_noise(group_ids, chain.sample_shape, generator).to(device)
    step_generator = step_generator if step_generator is not None else generator
    states, log_probs, x0_preds, stochastic, stds = [x], [], [], [], []
    chunks = _chunks(n, micro_batch_size or n)
    t_all = chain.timesteps.to(device)
    for k in range(chain.num_steps):
        t = t_all[k].expand(n)
        outputs = []
        for part in chunks:
            out = model_fn(x[part], t[part], select_rows(cond, part))
            outputs.append(step_with_logprob(chain, k, out, x[part], generator=step_generator))
        x = torch.cat([o.prev_sample for o in outputs]).to(x.dtype)
        states.append(x)
        log_probs.append(torch.cat([o.log_prob for o in outputs]))
        if kept_x0 is None or k in kept_x0:
            x0_preds.append(torch.cat([o.x0_pred for o in outputs]))
        stds.append(chain.steps[k].std)  # known when the chain was made: no device sync per step
        stochastic.append(chain.steps[k].std > 0)
    return Trajectory(
        states=torch.stack(states, dim=1),
        timesteps=t_all,
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
    chain: SamplingChain,
    trajectory: Trajectory,
    step: int,
    rows: slice | Tensor,
):
    """Re-score step ``step`` of chains ``rows`` under the current model (with gradients).

    Returns the StepOutput whose ``log_prob`` (rows,) is log pi_theta(x_{k+1} | x_k, c) of the
    recorded transition, on ``chain`` (the chain that sampled ``trajectory``). Pure in
    (x_k, t_k, t_{k+1}): no scheduler counters are touched.
    """
    x_t = trajectory.states[rows, step]
    t = trajectory.timesteps[step].expand(x_t.shape[0])
    out = model_fn(x_t, t, select_rows(trajectory.cond, rows))
    return step_with_logprob(chain, step, out, x_t, prev_sample=trajectory.states[rows, step + 1])
