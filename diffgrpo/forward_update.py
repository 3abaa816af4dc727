"""The loss terms of the forward-process objectives (DiffusionNFT, AWM) inside ``policy_update``.

Why a module of its own: the ratio and x0-regression objectives re-score the rollout's stored steps
(``diffgrpo.train_step.step_terms_loss``); DiffusionNFT (``diffgrpo.nft``) and advantage-weighted
matching (``diffgrpo.awm``) never replay the sampler. They noise the rollout's final samples x0 afresh,
x_t = alpha_t x0 + sigma_t eps (``diffgrpo.forward_process``, read from the chain's scheduler, in the
parametrisation its model predicts: x0 "sample" for the ego prior, flow "velocity" for shapes, epsilon
or velocity for text-to-image), and regress the model there. So a term is (micro-batch, noise draw j)
instead of (micro-batch, step k), and everything fixed during an update is computed once, before its
first optimiser step (:func:`prepare_forward_terms`): the noisings, DiffusionNFT's old-policy
predictions (the EMA of the trained weights swapped in) and the frozen reference's predictions for the
KL guard (``diffgrpo.guard``). Each runs on the very micro-batches and under the same autocast as the
update's own forward passes, so with the old policy equal to the trained one the deviation is exactly 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffgrpo.awm import AWMStats, awm_loss
from diffgrpo.chain import SamplingChain
from diffgrpo.config import GRPOConfig
from diffgrpo.ema import ParameterEMA
from diffgrpo.forward_process import ForwardProcess, NoisedBatch, forward_noise
from diffgrpo.nft import NFTStats, nft_loss
from diffgrpo.task import Task, select_rows


@dataclass(frozen=True)
class ForwardTerms:
    """What every loss term of one forward-process update reads (fixed during the update)."""

    process: ForwardProcess
    noised: list[NoisedBatch]
    """One forward noising of all N final samples per draw j (``LossConfig.timesteps_per_sample``)."""
    old: list[Tensor] | None
    """DiffusionNFT: f_old at each draw's (x_t, t), (N, ...) each, detached; None for AWM."""
    reference: list[Tensor] | None
    """f_ref at each draw's (x_t, t) when the guard is on (``kl_coef > 0``), else None."""


def plain_model_fn(task: Task, model: nn.Module) -> Callable[[Tensor, Tensor, object], Tensor]:
    """The model's own conditional prediction (no guidance): what the forward-process objectives regress.

    Why no guidance: they fit the model to its pretraining target on rewarded samples (DiffusionNFT is
    CFG-free); a guided output is a mixture of two calls, not the function that pretraining fits.
    """
    return lambda x_t, t, cond: task.predict(model, x_t, t, cond)


@torch.no_grad()
def predictions_at(model_fn, cond, noised: list[NoisedBatch], rows_list: list[slice], autocast) -> list[Tensor]:
    """``model_fn`` at every draw's (x_t, t), run on the micro-batches ``rows_list`` (covering all rows)."""
    out = []
    for batch in noised:
        parts = []
        for rows in rows_list:
            with autocast():
                parts.append(model_fn(batch.x_t[rows], batch.timesteps[rows], select_rows(cond, rows)).detach())
        out.append(torch.cat(parts))
    return out


def prepare_forward_terms(
    task: Task,
    model: nn.Module,
    chain: SamplingChain,
    samples: Tensor,
    cond,
    rows_list: list[slice],
    *,
    cfg: GRPOConfig,
    generator: torch.Generator,
    autocast=contextlib.nullcontext,
    reference: nn.Module | None = None,
    old_policy: ParameterEMA | None = None,
) -> ForwardTerms:
    """Noise the final ``samples`` (N, ...) ``cfg.loss.timesteps_per_sample`` times and precompute f_old and f_ref.

    ``generator`` draws every t and eps (so a resumed run draws the same); ``rows_list``: the update's
    micro-batches over all N rows. Raises ValueError when 'nft' has no ``old_policy`` or the guard
    (``kl_coef > 0``) no ``reference``.
    """
    loss_cfg = cfg.loss
    if loss_cfg.objective == "nft" and old_policy is None:
        raise ValueError("objective 'nft' needs its old policy: pass old_policy (a ParameterEMA of the trained "
                         "weights; train_grpo keeps it in the run state)")
    if loss_cfg.kl_coef > 0 and reference is None:
        raise ValueError(f"kl_coef={loss_cfg.kl_coef} needs the frozen reference policy; pass reference "
                         "(run_state.reference_policy) or set --grpo.loss.kl-coef 0")
    process = ForwardProcess.from_scheduler(chain.scheduler)
    noised = []
    for _ in range(loss_cfg.timesteps_per_sample):
        drawn = forward_noise(process, samples.to(generator.device), generator, loss_cfg.forward_timesteps)
        noised.append(NoisedBatch(*(t.to(samples.device) for t in
                                    (drawn.x0, drawn.noise, drawn.timesteps, drawn.x_t))))
    old = None
    if loss_cfg.objective == "nft":
        with old_policy.swapped_in(model):
            old = predictions_at(plain_model_fn(task, model), cond, noised, rows_list, autocast)
    ref = None
    if loss_cfg.kl_coef > 0:
        ref = predictions_at(plain_model_fn(task, reference), cond, noised, rows_list, autocast)
    return ForwardTerms(process=process, noised=noised, old=old, reference=ref)


def forward_terms_loss(
    model_fn, terms: ForwardTerms, cond, advantages: Tensor, mask: Tensor, draw: int, rows: slice | Tensor, *,
    cfg: GRPOConfig,
) -> tuple[Tensor, NFTStats | AWMStats]:
    """The nft / awm loss of one (micro-batch ``rows``, noise draw ``draw``) term and its stats.

    ``model_fn``: :func:`plain_model_fn` of the trained model; ``advantages``, ``mask``: (N,) of the rollout;
    ``rows``: a slice or (n,) row indices.
    The loss averages over the kept samples of ``rows``; the guard's weight is ``cfg.loss.kl_coef``.
    """
    full = terms.noised[draw]
    batch = NoisedBatch(x0=full.x0[rows], noise=full.noise[rows], timesteps=full.timesteps[rows], x_t=full.x_t[rows])
    prediction = model_fn(batch.x_t, batch.timesteps, select_rows(cond, rows))
    ref = terms.reference[draw][rows] if terms.reference is not None else None
    loss_cfg = cfg.loss
    if loss_cfg.objective == "nft":
        nft_cfg = dataclasses.replace(loss_cfg.nft, kl_coef=loss_cfg.kl_coef)
        return nft_loss(prediction, terms.old[draw][rows], batch, advantages[rows], terms.process, nft_cfg,
                        prediction_ref=ref, mask=mask[rows])
    if loss_cfg.objective == "awm":
        awm_cfg = dataclasses.replace(loss_cfg.awm, kl_coef=loss_cfg.kl_coef)
        return awm_loss(prediction, batch, advantages[rows], terms.process, awm_cfg, prediction_ref=ref,
                        mask=mask[rows])
    raise ValueError(f"objective={loss_cfg.objective!r} is not a forward-process objective ('nft', 'awm')")
