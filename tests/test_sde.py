"""diffgrpo.sde: each step is the Gaussian it claims to be, and matches diffusers where both exist."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Normal

from diffgrpo.sde import StepOutput, gaussian_log_prob, reverse_step

N_DRAWS = 20_000
REDUCTIONS = st.sampled_from(["sum", "mean"])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddim(prediction_type: str = "epsilon", n: int = 50, **kw) -> DDIMScheduler:
    kw.setdefault("clip_sample", False)
    kw.setdefault("steps_offset", 1)  # table 981, 961, ..., 1 (Stable Diffusion's setting)
    sched = DDIMScheduler(prediction_type=prediction_type, **kw)
    sched.set_timesteps(n)
    return sched


def _ddpm(prediction_type: str = "epsilon", n: int | None = 50, **kw) -> DDPMScheduler:
    kw.setdefault("clip_sample", False)
    sched = DDPMScheduler(prediction_type=prediction_type, **kw)
    if n is not None:
        sched.set_timesteps(n)
    return sched


def _egoallo_sched() -> DDPMScheduler:
    return _ddpm("sample", n=None, beta_schedule="squaredcos_cap_v2")


def _flow(n: int = 10, shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    return sched


def _reference_log_prob(x: torch.Tensor, out: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent float64 density via torch.distributions: (sum, per-dimension mean) per element."""
    dist = Normal(out.mean.double(), out.std.double().expand_as(out.mean))
    elementwise = dist.log_prob(x.double()).reshape(x.shape[0], -1)
    return elementwise.sum(1), elementwise.mean(1)


# (scheduler factory, method, timestep, next_timestep, extra kwargs) for every method.
MC_CASES = {
    "ddim": (lambda: _ddim("epsilon"), "ddim", 501, None, {"eta": 0.7}),
    "ddpm": (lambda: _ddpm("v_prediction"), "ddpm", 400, None, {"eta": 1.0}),
    "egoallo": (_egoallo_sched, "egoallo", 840, 783, {"eta": 0.8}),
    "egoallo_no_offset": (
        _egoallo_sched,
        "egoallo",
        99,
        80,
        {"eta": 0.8, "egoallo_denominator_offset": 0.0},
    ),
    "flow_sde": (lambda: _flow(), None, None, None, {"eta": 0.7}),
    "cps": (lambda: _flow(), "cps", None, None, {"eta": 0.5}),
}


@pytest.mark.parametrize("case", sorted(MC_CASES))
def test_monte_carlo_matches_returned_gaussian_and_density(case: str) -> None:
    make, method, t, t_next, kw = MC_CASES[case]
    sched = make()
    if t is None:  # flow: a mid-schedule entry of the shifted table
        t = float(sched.timesteps[4])
    dims = 3
    x_t = torch.randn(1, dims, generator=_gen(1)).expand(N_DRAWS, dims)
    model_out = torch.randn(1, dims, generator=_gen(2)).expand(N_DRAWS, dims)
    out = reverse_step(
        sched, model_out, t, x_t, next_timestep=t_next, method=method, generator=_gen(3), **kw
    )
    assert bool(out.is_stochastic.all())
    std = out.std[0, 0]
    assert float(std) > 0
    draws = out.prev_sample.double()
    tol_mean = 5 * float(std) / math.sqrt(N_DRAWS)
    assert torch.allclose(draws.mean(0), out.mean[0].double(), atol=tol_mean)
    emp_std = draws.std(0)
    assert torch.allclose(emp_std, torch.full_like(emp_std, float(std)), rtol=5 / math.sqrt(2 * N_DRAWS))
    ref_sum, ref_mean = _reference_log_prob(out.prev_sample, out)
    assert torch.allclose(out.log_prob.double(), ref_sum, rtol=1e-5, atol=1e-4)
    scored = reverse_step(
        sched,
        model_out,
        t,
        x_t,
        next_timestep=t_next,
        method=method,
        prev_sample=out.prev_sample,
        log_prob_reduction="mean",
        **kw,
    )
    assert torch.allclose(scored.log_prob.double(), ref_mean, rtol=1e-5, atol=1e-5)
    assert scored.prev_sample is out.prev_sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers_step(prediction_type: str, eta: float) -> None:
    sched = _ddim(prediction_type, n=50, clip_sample=True)  # clipping exercised with |x0| > 1
    timesteps = torch.tensor([981, 741, 501, 261, 21, 1])
    x_t = 2.0 * torch.randn(6, 4, 8, 8, generator=_gen(0))
    model_out = 2.0 * torch.randn(6, 4, 8, 8, generator=_gen(1))
    out = reverse_step(sched, model_out, timesteps, x_t, eta=eta, generator=_gen(2))
    for i, t in enumerate(timesteps.tolist()):
        ref = sched.step(
            model_out[i : i + 1], t, x_t[i : i + 1], eta=eta, variance_noise=torch.zeros(1, 4, 8, 8)
        )
        assert torch.allclose(out.mean[i : i + 1], ref.prev_sample, atol=1e-5)
        assert torch.allclose(out.x0_pred[i : i + 1], ref.pred_original_sample, atol=1e-5)
        prev_t = t - 1000 // 50
        ref_std = eta * sched._get_variance(t, prev_t) ** 0.5
        assert torch.allclose(out.std[i].flatten(), ref_std.reshape(1), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("n_inference", [50, None])
def test_ddpm_matches_diffusers_step(prediction_type: str, n_inference: int | None) -> None:
    """Compared in float64: diffusers' float32 coefficients lose ~1e-4 near t = 0 (ours stay float64)."""
    sched = _ddpm(prediction_type, n=n_inference, clip_sample=True)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # diffusers' own step, run in float64
    timesteps = [980, 500, 20, 0] if n_inference else [999, 500, 1, 0]
    x_t = 2.0 * torch.randn(1, 3, 5, 5, generator=_gen(0), dtype=torch.float64)
    model_out = torch.randn(1, 3, 5, 5, generator=_gen(1), dtype=torch.float64)
    for t in timesteps:
        ref = sched.step(model_out, t, x_t, generator=_gen(7)).prev_sample  # mean + sqrt(var) * noise
        out = reverse_step(sched, model_out, t, x_t, generator=_gen(7))
        assert torch.allclose(out.prev_sample, ref, atol=1e-10)
        assert out.next_timestep.item() == int(sched.previous_timestep(t))
        expected_std = sched._get_variance(t) ** 0.5 if t > 0 else torch.tensor(0.0)
        assert torch.allclose(out.std.flatten(), expected_std.reshape(1).double(), atol=1e-12)
        in_float32 = reverse_step(sched, model_out.float(), t, x_t.float())
        assert torch.allclose(in_float32.mean.double(), out.mean, atol=2e-6)


@pytest.mark.parametrize("n", [1, 7, 10, 50])
@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_default_next_timestep_is_the_next_table_entry(spacing: str, scheduler_cls: type, n: int) -> None:
    """t' comes from `scheduler.timesteps`, never t - T // n (linspace 999 -> 888, not 899; 111 -> 0)."""
    sched = scheduler_cls(num_train_timesteps=1000, timestep_spacing=spacing, clip_sample=False)
    sched.set_timesteps(n)
    table = sched.timesteps.tolist()
    expected = table[1:] + [-1]  # the step after the table's last entry is final
    x_t = torch.randn(n, 2, 3, generator=_gen(0), dtype=torch.float64)
    model_out = torch.randn(n, 2, 3, generator=_gen(1), dtype=torch.float64)
    out = reverse_step(sched, model_out, sched.timesteps, x_t, eta=1.0, generator=_gen(2))
    assert out.next_timestep.long().tolist() == expected
    explicit = reverse_step(
        sched, model_out, sched.timesteps, x_t, eta=1.0, prev_sample=out.prev_sample,
        next_timestep=torch.tensor(expected),
    )
    assert torch.equal(explicit.log_prob, out.log_prob)
    sched.alphas_cumprod = sched.alphas_cumprod.double()  # diffusers' own step, run in float64
    for i, t in enumerate(table):
        x_i, out_i = x_t[i : i + 1], model_out[i : i + 1]
        if scheduler_cls is DDPMScheduler:  # its step reads the table (previous_timestep) for every spacing
            ref = sched.step(out_i, t, x_i, generator=_gen(7)).prev_sample
            mine = reverse_step(sched, out_i, t, x_i, generator=_gen(7)).prev_sample
            assert torch.allclose(mine, ref, atol=1e-10)
        elif all(a - b == 1000 // n for a, b in zip(table[:-1], expected[:-1], strict=True)) and table[-1] < 1000 // n:
            # DDIM's step uses t - T // n: only compared where that arithmetic agrees with the table
            ref = sched.step(out_i, t, x_i, eta=1.0, variance_noise=torch.zeros_like(x_i)).prev_sample
            assert torch.allclose(out.mean[i : i + 1], ref, atol=1e-10)


def test_ddpm_custom_timesteps_and_full_chain_resolve_next_timestep() -> None:
    x_t, model_out = torch.randn(4, 3, generator=_gen(0)), torch.randn(4, 3, generator=_gen(1))
    custom = _ddpm(n=None)
    custom.set_timesteps(timesteps=[900, 500, 130, 7])
    out = reverse_step(custom, model_out, torch.tensor([900, 500, 130, 7]), x_t)
    assert out.next_timestep.long().tolist() == [500, 130, 7, -1]
    full_chain = _ddpm(n=None)  # no set_timesteps: diffusers' DDPM walks every training step
    out = reverse_step(full_chain, model_out, torch.tensor([999, 500, 1, 0]), x_t)
    assert out.next_timestep.long().tolist() == [998, 499, 0, -1]


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DDPMScheduler])
def test_timestep_missing_from_table_needs_explicit_next(scheduler_cls: type) -> None:
    sched = scheduler_cls(timestep_spacing="linspace", clip_sample=False)
    sched.set_timesteps(10)  # 999, 888, ..., 111, 0
    x_t, model_out = torch.randn(1, 3, generator=_gen(0)), torch.randn(1, 3, generator=_gen(1))
    with pytest.raises(ValueError, match=r"timestep \[899\] is not .*scheduler.timesteps.*pass next_timestep"):
        reverse_step(sched, model_out, 899, x_t)
    out = reverse_step(sched, model_out, 899, x_t, next_timestep=799)
    assert out.next_timestep.long().tolist() == [799]


def test_ddpm_posterior_equals_ddim_at_eta_one_and_eta_only_scales_std() -> None:
    sched = _ddpm("epsilon")
    x_t, model_out = torch.randn(3, 6, generator=_gen(0)), torch.randn(3, 6, generator=_gen(1))
    t, t_next = torch.tensor([900, 400, 60]), torch.tensor([700, 399, -1])  # non-adjacent pairs too
    ddpm = reverse_step(sched, model_out, t, x_t, next_timestep=t_next, method="ddpm", eta=1.0)
    ddim = reverse_step(sched, model_out, t, x_t, next_timestep=t_next, method="ddim", eta=1.0)
    assert torch.allclose(ddpm.mean, ddim.mean, atol=1e-5)
    assert torch.allclose(ddpm.std, ddim.std, atol=1e-7)
    cool = reverse_step(sched, model_out, t, x_t, next_timestep=t_next, method="ddpm", eta=0.5)
    assert torch.allclose(cool.mean, ddpm.mean)
    assert torch.allclose(cool.std, 0.5 * ddpm.std)


@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_egoallo_step_matches_method_formula(offset: float) -> None:
    sched = _egoallo_sched()
    abar = sched.alphas_cumprod.double()
    ks = [1000] + [k * k for k in range(29, -1, -1)]  # EgoAllo's integers; diffusers index = k - 1
    for k, k_next in zip(ks[:-1], ks[1:], strict=True):
        d, d_next = k - 1, k_next - 1
        x_t, x0 = torch.randn(2, 5, generator=_gen(k)), torch.randn(2, 5, generator=_gen(k + 1))
        out = reverse_step(
            sched,
            x0,
            d,
            x_t,
            next_timestep=d_next,
            method="egoallo",
            eta=0.8,
            egoallo_denominator_offset=offset,
        )
        a_t = abar[d]
        a_next = abar[d_next] if d_next >= 0 else torch.tensor(1.0, dtype=torch.float64)
        a_prev1 = abar[d - 1] if d >= 1 else torch.tensor(1.0, dtype=torch.float64)
        s = 0.8 * torch.sqrt((1 - a_prev1) / (1 - a_t) * (1 - a_t / a_prev1))
        mean = a_next.sqrt() * x0.double() + torch.sqrt(1 - a_next - s**2) * (
            x_t.double() - a_t.sqrt() * x0.double()
        ) / torch.sqrt(1 - a_t + offset)
        assert torch.allclose(out.mean.double(), mean, atol=1e-5), (k, k_next)
        assert torch.allclose(out.std.double().flatten(), s.expand(2), atol=1e-6)
        assert bool(out.is_stochastic.all()) == (k_next > 0)  # only 1 -> 0 is deterministic


def test_per_element_timesteps_equal_elementwise_results() -> None:
    x_t, model_out = torch.randn(4, 2, 3, generator=_gen(0)), torch.randn(4, 2, 3, generator=_gen(1))
    prev = torch.randn(4, 2, 3, generator=_gen(2))
    cases = [
        (_ddim("v_prediction"), None, [981, 501, 41, 1], None),
        (_ddpm("epsilon"), None, [980, 500, 20, 0], None),
        (_egoallo_sched(), "egoallo", [999, 840, 3, 0], [840, 783, 0, -1]),
        (_flow(), None, None, None),
    ]
    for sched, method, ts, ts_next in cases:
        if ts is None:
            ts = sched.timesteps[[0, 3, 7, 9]].tolist()
        batched = reverse_step(
            sched,
            model_out,
            torch.tensor(ts),
            x_t,
            prev_sample=prev,
            method=method,
            eta=0.8,
            next_timestep=None if ts_next is None else torch.tensor(ts_next),
        )
        for i in range(4):
            single = reverse_step(
                sched,
                model_out[i : i + 1],
                ts[i],
                x_t[i : i + 1],
                prev_sample=prev[i : i + 1],
                method=method,
                eta=0.8,
                next_timestep=None if ts_next is None else ts_next[i],
            )
            for field in ("mean", "std", "log_prob", "x0_pred", "next_timestep"):
                assert torch.allclose(
                    getattr(batched, field)[i : i + 1], getattr(single, field), atol=1e-6
                ), field


def test_generator_list_gives_one_stream_per_element() -> None:
    sched = _ddim()
    x_t, model_out = torch.randn(3, 4, generator=_gen(0)), torch.randn(3, 4, generator=_gen(1))
    batched = reverse_step(sched, model_out, 501, x_t, generator=[_gen(10 + i) for i in range(3)])
    for i in range(3):
        single = reverse_step(sched, model_out[i : i + 1], 501, x_t[i : i + 1], generator=_gen(10 + i))
        assert torch.equal(batched.prev_sample[i : i + 1], single.prev_sample)
    again = reverse_step(sched, model_out, 501, x_t, generator=[_gen(10 + i) for i in range(3)])
    assert torch.equal(again.prev_sample, batched.prev_sample)


def test_flow_sde_shifted_table_formula_and_ode_limit() -> None:
    sched = _flow(n=10, shift=3.0)
    sigmas = sched.sigmas.double()
    x_t, v = torch.randn(2, 6, generator=_gen(0)), torch.randn(2, 6, generator=_gen(1))
    for i in (0, 2, 6):
        t = sched.timesteps[i]
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eta = 0.7
        out = reverse_step(sched, v, t, x_t, eta=eta)
        dt = sigma_next - sigma
        one_minus = 1 - (sigma_next if sigma >= 1 else sigma)  # sigma = 1 uses the next sigma (documented)
        s = eta * torch.sqrt(sigma / one_minus)
        xd, vd = x_t.double(), v.double()
        mean = xd + dt * (vd + s**2 / (2 * sigma) * (xd + (1 - sigma) * vd))
        assert torch.allclose(out.mean.double(), mean, atol=1e-5)
        assert torch.allclose(out.std.double().flatten(), (s * torch.sqrt(-dt)).expand(2), atol=1e-6)
        euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        euler.set_timesteps(10)
        euler._step_index = i  # diffusers' stateful Euler step, positioned by hand on step i
        ode = euler.step(v, t, x_t).prev_sample
        exact_ode = reverse_step(sched, v, t, x_t, eta=0.0)
        assert torch.allclose(exact_ode.mean, ode, atol=1e-6)
        assert not bool(exact_ode.is_stochastic.any())
        near_ode = reverse_step(sched, v, t, x_t, eta=1e-3)
        assert torch.allclose(near_ode.mean, ode, atol=1e-5)
        assert float(near_ode.std.max()) <= 1.001e-3  # = eta at sigma = 1


def test_flow_duplicate_timesteps_require_explicit_next() -> None:
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[1.0, 0.6, 0.6, 0.3])  # 600 appears twice: its next sigma is ambiguous
    x_t, v = torch.randn(1, 4, generator=_gen(0)), torch.randn(1, 4, generator=_gen(1))
    with pytest.raises(ValueError, match="ambiguous; pass next_timestep"):
        reverse_step(sched, v, 600.0, x_t)
    first = reverse_step(sched, v, 600.0, x_t, next_timestep=600.0)
    second = reverse_step(sched, v, 600.0, x_t, next_timestep=300.0)
    assert torch.equal(first.mean, x_t) and not bool(first.is_stochastic.any())  # dt = 0: identity
    assert bool(second.is_stochastic.all())
    unique = reverse_step(sched, v, 1000.0, x_t)  # unique entries still resolve from the table
    assert torch.allclose(unique.next_timestep, torch.tensor([600.0]))


def test_cps_keeps_noise_level() -> None:
    """With exact x0 and x1 the CPS step lands on x' = (1 - sigma') x0 + sigma' z with z ~ N(0, I)."""
    sched = _flow(n=10, shift=1.0)
    i = 3
    sigma, sigma_next = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
    x0 = torch.randn(1, 2, generator=_gen(0)).expand(N_DRAWS, 2)
    x1 = torch.randn(N_DRAWS, 2, generator=_gen(1))
    x_t = (1 - sigma) * x0 + sigma * x1
    out = reverse_step(sched, x1 - x0, sched.timesteps[i], x_t, method="cps", eta=0.6, generator=_gen(2))
    residual = (out.prev_sample - (1 - sigma_next) * x0).double()
    assert torch.allclose(residual.std(0), torch.full((2,), sigma_next, dtype=torch.float64), rtol=0.03)


def test_deterministic_final_steps_have_zero_std_and_log_prob() -> None:
    x_t = torch.randn(3, 4, generator=_gen(0))
    model_out = torch.randn(3, 4, generator=_gen(1)).requires_grad_(True)
    off_mean = torch.randn(3, 4, generator=_gen(2))  # scored prev_sample deliberately off the mean
    expected_stochastic = {"ddim": [False, True, False], "ddpm": [False, True, False]}
    cases = [
        (_ddim(), "ddim", torch.tensor([1, 21, 1]), None),  # 1 -> final (abar = 1)
        (_ddpm(), "ddpm", torch.tensor([0, 20, 0]), None),  # 0 -> final
        # 0 -> final by the formula (abar_{-1} = 1); 24 -> final forced (no noise budget); 3 -> 0 is noisy
        (_egoallo_sched(), "egoallo", torch.tensor([0, 24, 3]), torch.tensor([-1, -1, 0])),
        (_flow(), "flow_sde", torch.tensor([90.0, 500.0, 90.0]), torch.tensor([0.0, 0.0, 60.0])),
        (_flow(), "cps", torch.tensor([90.0, 500.0, 90.0]), torch.tensor([0.0, 0.0, 60.0])),
    ]
    for sched, method, t, t_next in cases:
        for prev in (None, off_mean):
            out = reverse_step(
                sched,
                model_out,
                t,
                x_t,
                next_timestep=t_next,
                method=method,
                prev_sample=prev,
                generator=_gen(3),
            )
            expected = torch.tensor(expected_stochastic.get(method, [False, False, True]))
            assert torch.equal(out.is_stochastic, expected), method
            assert torch.all(out.std.flatten()[~expected] == 0), method
            assert torch.all(out.log_prob[~expected] == 0) and torch.all(out.log_prob[expected] != 0), method
            assert bool(torch.isfinite(out.log_prob).all() and torch.isfinite(out.mean).all()), method
            (grad,) = torch.autograd.grad(out.log_prob.sum() + out.mean.sum(), model_out)
            assert bool(torch.isfinite(grad).all()), method
    flow_end = reverse_step(_flow(), model_out, 90.0, x_t, next_timestep=0.0)
    assert torch.allclose(flow_end.prev_sample, x_t - 0.09 * model_out)  # lands on x0 = x - sigma v


def test_bf16_model_output_gives_float32_density() -> None:
    sched = _ddim("epsilon")
    x_t = torch.randn(2, 4, 8, generator=_gen(0)).bfloat16()
    model_out = torch.randn(2, 4, 8, generator=_gen(1)).bfloat16()
    out = reverse_step(sched, model_out, 501, x_t, generator=_gen(2))
    assert out.log_prob.dtype == torch.float32 and out.mean.dtype == torch.float32
    assert out.prev_sample.dtype == torch.bfloat16  # returned in the sample's dtype ...
    ref_sum, _ = _reference_log_prob(out.prev_sample, out)  # ... and scored exactly as returned
    assert torch.allclose(out.log_prob.double(), ref_sum, rtol=1e-5)
    rescored = reverse_step(sched, model_out, 501, x_t, prev_sample=out.prev_sample)
    assert torch.equal(rescored.log_prob, out.log_prob)  # on-policy ratio is exactly 1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.floats(0.05, 3.0), REDUCTIONS, st.booleans())
def test_gaussian_log_prob_matches_normal(
    batch: int, dims: int, scale: float, reduction: str, per_element_std: bool
) -> None:
    g = _gen(batch * 100 + dims)
    mean, x = torch.randn(batch, dims, 2, generator=g), torch.randn(batch, dims, 2, generator=g)
    std_shape = (batch, 1, 1) if per_element_std else (batch, dims, 2)
    std = scale * (0.5 + torch.rand(std_shape, generator=g))
    ref = Normal(mean.double(), std.double().expand_as(mean)).log_prob(x.double()).reshape(batch, -1)
    ref = ref.sum(1) if reduction == "sum" else ref.mean(1)
    assert torch.allclose(gaussian_log_prob(x, mean, std, reduction).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.unchecked_annotations
def test_bad_inputs_raise_clear_errors() -> None:
    ddim, flow = _ddim(), _flow()
    x_t, out = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="unknown method 'ddim_typo'"):
        reverse_step(ddim, out, 501, x_t, method="ddim_typo")
    with pytest.raises(ValueError, match="does not apply to DDIMScheduler"):
        reverse_step(ddim, out, 501, x_t, method="flow_sde")
    with pytest.raises(ValueError, match="does not apply to FlowMatchEulerDiscreteScheduler"):
        reverse_step(flow, out, 500.0, x_t, method="egoallo")
    with pytest.raises(ValueError, match=r"model_output shape \(2, 6\) != sample shape \(2, 3\)"):
        reverse_step(ddim, torch.randn(2, 6), 501, x_t)
    with pytest.raises(ValueError, match=r"prev_sample shape"):
        reverse_step(ddim, out, 501, x_t, prev_sample=torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"timestep has shape \(3,\); pass a scalar or a \(2,\) tensor"):
        reverse_step(ddim, out, torch.tensor([501, 481, 461]), x_t)
    bad = x_t.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"sample has NaN/inf at batch elements \[1\]"):
        reverse_step(ddim, out, 501, bad)
    with pytest.raises(ValueError, match="eta=1.5 > 1 is undefined"):
        reverse_step(ddim, out, 501, x_t, eta=1.5)
    with pytest.raises(ValueError, match="must not be noisier"):
        reverse_step(ddim, out, 501, x_t, next_timestep=701)
    with pytest.raises(ValueError, match="call set_timesteps"):
        reverse_step(DDIMScheduler(), out, 501, x_t)
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        reverse_step(ddim, out, 1000, x_t, next_timestep=841)
    with pytest.raises(ValueError, match="got 3 generators for batch size 2"):
        reverse_step(ddim, out, 501, x_t, generator=[_gen(0), _gen(1), _gen(2)])
    with pytest.raises(ValueError, match="log_prob_reduction='avg'"):
        reverse_step(ddim, out, 501, x_t, log_prob_reduction="avg")
    with pytest.raises(ValueError, match="variance_type='fixed_large'; build it with variance_type="):
        reverse_step(DDPMScheduler(variance_type="fixed_large"), out, 500, x_t)
    nan_out = out.clone()
    nan_out[0, 1] = float("nan")  # element 0 steps into sigma' = 0 (std 0): NaN must not hide as log_prob 0
    with pytest.raises(ValueError, match=r"model_output has NaN/inf at batch elements \[0\]"):
        t, t_next = torch.tensor([90.0, 500.0]), torch.tensor([0.0, 400.0])
        reverse_step(flow, nan_out, t, x_t, next_timestep=t_next)
    with pytest.raises(ValueError, match="unsupported scheduler"):
        reverse_step(object(), out, 501, x_t)
