"""Non-finite updates never reach the weights; degenerate chains and empty batches are refused up front.

Issue 24 items 3, 5 and 7: one inf gradient element became NaN in a weight and both Adam moments and was
saved; an empty batch gave IndexError or torch internals; a chain with no stochastic step was found only
after a full rollout; eta 1e-8 was accepted although mean + std z rounds back onto the mean in float32.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from diffgrpo.config import GRPOConfig, OptimConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer
from diffgrpo.train_step import collect, make_perturber, policy_update
from diffgrpo.trainer import check_run
from tests.toy_task import ToyNet, ToyTask, toy_chain


def _cfg(**optim) -> GRPOConfig:
    return GRPOConfig(num_iterations=2, conditions_per_iteration=4, group_size=4, micro_batch_size=8,
                      rewards=("toy_closeness",), optim=OptimConfig(learning_rate=1e-3, **optim))


def _setup(**optim):
    torch.manual_seed(0)
    task, model, cfg = ToyTask("ddim"), ToyNet(), _cfg(**optim)
    chain = toy_chain(task)
    optimizer, _ = make_optimizer(model, cfg)
    data = collect(task, model, chain, task.load_examples("train", torch.arange(4)), cfg=cfg,
                   rewards=RewardSet.from_specs({"toy_closeness": 1.0}), perturber=make_perturber(cfg),
                   generator=make_generator(0), group_id_offset=0)

    def update(**kw):
        return policy_update(task, model, chain, data, optimizer, cfg=cfg, generator=make_generator(1),
                             accelerator=Accelerator(cpu=True), **kw)

    update()  # one finite step: the Adam moments exist
    return model, optimizer, update


def _inject_inf(param: torch.Tensor):
    """One gradient element of ``param`` becomes +inf on every backward."""
    def hook(grad):
        grad = grad.clone()
        grad.view(-1)[3] = float("inf")
        return grad
    return param.register_hook(hook)


def _snapshot(model, optimizer):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {(i, k): v.clone() for i, state in enumerate(optimizer.state.values()) for k, v in state.items()}
    return weights, moments


def test_one_inf_gradient_element_skips_the_step_and_leaves_weights_and_moments_untouched():
    model, optimizer, update = _setup()
    before_weights, before_moments = _snapshot(model, optimizer)
    handle = _inject_inf(model.net[0].weight)
    stats = update()
    handle.remove()
    assert stats["loss/nonfinite_steps"] == 1.0 and stats["loss/optimizer_steps"] == 0.0
    after_weights, after_moments = _snapshot(model, optimizer)
    for key, value in before_weights.items():
        assert torch.equal(value, after_weights[key]) and bool(torch.isfinite(after_weights[key]).all()), key
    for key, value in before_moments.items():  # exp_avg, exp_avg_sq and the step count
        assert torch.equal(value, after_moments[key]) and bool(torch.isfinite(after_moments[key]).all()), key
    assert update()["loss/optimizer_steps"] == 1.0  # the next finite update steps again


def test_stop_policy_names_the_parameter_and_leaves_the_weights_untouched():
    from diffgrpo.finite_update import NonFiniteUpdateError

    model, optimizer, update = _setup(on_nonfinite="stop")
    before_weights, _ = _snapshot(model, optimizer)
    _inject_inf(model.net[2].bias)
    with pytest.raises(NonFiniteUpdateError, match=r"gradients of 1 parameters \['net\.2\.bias'\].*on-nonfinite stop"):
        update()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_weights.items())


def test_consecutive_skips_past_the_limit_stop_the_run():
    from diffgrpo.finite_update import FiniteUpdateGuard, NonFiniteUpdateError

    model, optimizer, update = _setup(max_consecutive_nonfinite=2)
    guard = FiniteUpdateGuard.from_config(_cfg(max_consecutive_nonfinite=2).optim)
    _inject_inf(model.net[0].weight)
    assert update(guard=guard)["loss/nonfinite_steps"] == 1.0
    with pytest.raises(NonFiniteUpdateError, match=r"2 optimiser steps in a row.*max-consecutive-nonfinite 2"):
        update(guard=guard)
    assert guard.state_dict() == {"consecutive": 2, "skipped": 2}


@pytest.mark.parametrize(("eta", "steps"), [(1e-8, r"\[0, 1, 2, 3, 4\]"), (1e-6, r"\[3, 4\]")])
def test_steps_whose_std_rounds_onto_the_mean_are_refused_before_sampling(eta, steps):
    task = ToyTask("ddim")
    chain = toy_chain(task, eta=eta)
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0))  # why: mean + std z rounds onto mean
    mean = torch.full_like(z, 0.7)
    assert float(((mean + 1e-8 * z) == mean).float().mean()) > 0.99  # |z| < 2.98: 99.7 %
    with pytest.raises(ValueError, match=rf"steps {steps} of the sampling chain have stds .* float32 ulps"):
        check_run(task, _cfg(), chain)


def test_a_chain_without_a_stochastic_step_is_refused_before_sampling():
    task = ToyTask("ddim")
    with pytest.raises(ValueError, match="no step of the sampling chain is stochastic"):
        check_run(task, _cfg(), toy_chain(task, eta=0.0))


def test_empty_batches_are_refused_naming_the_batch():
    from diffgrpo.evaluate import evaluate
    from diffgrpo.rollout import rollout

    task, model, cfg = ToyTask("ddim"), ToyNet(), _cfg()
    chain = toy_chain(task)
    empty = task.load_examples("train", torch.arange(0))
    with pytest.raises(ValueError, match="collect got an empty batch: 0 conditions"):
        collect(task, model, chain, empty, cfg=cfg, rewards=RewardSet.from_specs({"toy_closeness": 1.0}),
                perturber=make_perturber(cfg), generator=make_generator(0), group_id_offset=0)
    with pytest.raises(ValueError, match="rollout got an empty batch"):
        rollout(lambda x, t, c: x, chain, torch.zeros(0, 1), torch.zeros(0, dtype=torch.long),
                generator=make_generator(0))
    with pytest.raises(ValueError, match="evaluate got an empty batch: split 'test'.*max_examples=0"):
        evaluate(task, model, chain, seed=0, max_examples=0, progress=False)


@pytest.mark.slow
def test_a_nonfinite_shard_on_one_rank_stops_the_step_and_the_save_on_both(tmp_path):
    """FSDP2 on 2 CPU ranks: an inf in rank 1's gradient shard skips the step on both ranks, and a NaN in
    rank 1's weight shard makes save_checkpoint refuse on both, writing nothing
    (tests/scripts/two_rank_nonfinite.py)."""
    import shutil

    from tests.test_multiprocess_sync import SCRIPTS, launch_two_ranks

    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    launch_two_ranks(SCRIPTS / "two_rank_nonfinite.py", str(tmp_path), log=tmp_path / "log.txt")
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"rank{rank}.pt")
        assert seen["allowed"] is False and seen["skipped"] == 1
        assert "not writing checkpoint" in seen["save_error"] and "non-finite weight" in seen["save_error"]
        assert not [name for name in seen["written"] if name.startswith("step_000001")]
