"""The forward process against diffusers' own noising, and the parametrisation maps against each other."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffgrpo.forward_process import ForwardProcess, TimestepSampling, forward_noise, regression_residual
from diffgrpo.guard import prediction_gap

DDPM_TYPES = ("sample", "epsilon", "v_prediction")


def _processes() -> list[ForwardProcess]:
    ddpm = [ForwardProcess.from_scheduler(DDPMScheduler(num_train_timesteps=50, prediction_type=p))
            for p in DDPM_TYPES]
    return [*ddpm, ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))]


def _timesteps(process: ForwardProcess, n: int, seed: int = 0) -> torch.Tensor:
    return process.sample_timesteps(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("prediction_type", DDPM_TYPES)
def test_ddpm_noising_and_v_target_match_diffusers(scheduler_cls, prediction_type):
    scheduler = scheduler_cls(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2",
                              prediction_type=prediction_type)
    process = ForwardProcess.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 3, 2, generator=gen), torch.randn(6, 3, 2, generator=gen)
    t = torch.tensor([0, 1, 17, 25, 48, 49])
    torch.testing.assert_close(process.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t),
                               atol=1e-6, rtol=1e-5)
    expected = {"sample": x0, "epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    torch.testing.assert_close(process.training_target(x0, noise, t), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_noising_matches_scale_noise_on_the_sampler_grid(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(8)
    process = ForwardProcess.from_scheduler(scheduler)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    t = scheduler.timesteps.flip(0)  # every grid entry, one per element
    torch.testing.assert_close(process.add_noise(x0, noise, t), scheduler.scale_noise(x0, t, noise),
                               atol=1e-5, rtol=1e-5)
    sigma = (t / 1000.0)[:, None]
    torch.testing.assert_close(process.training_target(x0, noise, t), noise - x0)
    torch.testing.assert_close(process.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise)


@pytest.mark.parametrize("process", _processes(), ids=lambda p: p.prediction_type)
def test_prediction_and_x0_round_trip(process):
    gen = torch.Generator().manual_seed(3)
    t = _timesteps(process, 32)
    x_t, f, x0_hat = (torch.randn(32, 5, dtype=torch.float64, generator=gen) for _ in range(3))
    torch.testing.assert_close(process.x0_to_prediction(process.prediction_to_x0(f, x_t, t), x_t, t), f)
    torch.testing.assert_close(process.prediction_to_x0(process.x0_to_prediction(x0_hat, x_t, t), x_t, t), x0_hat)


@pytest.mark.parametrize("process", _processes(), ids=lambda p: p.prediction_type)
def test_the_target_is_the_prediction_of_the_true_x0(process):
    """Given the true x0 (a point-mass data distribution), the target implies x0 and residuals are 0."""
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(16, 3, dtype=torch.float64, generator=gen), torch.randn(16, 3, dtype=torch.float64,
                                                                                     generator=gen)
    t = _timesteps(process, 16)
    x_t = process.add_noise(x0, noise, t)
    target = process.training_target(x0, noise, t)
    torch.testing.assert_close(process.prediction_to_x0(target, x_t, t), x0)
    torch.testing.assert_close(process.x0_to_prediction(x0, x_t, t), target)


@pytest.mark.parametrize("process", _processes(), ids=lambda p: p.prediction_type)
def test_the_regression_minimiser_is_the_posterior_mean_in_each_parametrisation(process):
    """Monte Carlo: for data N(m, v) the least-squares fit of the target on x_t (the perfect model, linear
    here) equals x0_to_prediction(E[x0 | x_t]), E[x0 | x_t] = m + alpha v (x_t - alpha m) / (alpha^2 v + sigma^2)."""
    gen = torch.Generator().manual_seed(5)
    n, m, v = 200_000, 0.7, 0.5
    t_one = process.sample_timesteps(1, torch.Generator().manual_seed(6), TimestepSampling(low=0.3, high=0.7))
    t = t_one.expand(n)
    x0 = m + v**0.5 * torch.randn(n, 1, dtype=torch.float64, generator=gen)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    x_t, target = process.add_noise(x0, noise, t), process.training_target(x0, noise, t)
    design = torch.cat([torch.ones_like(x_t), x_t], dim=1)  # [n, 2]
    coef = torch.linalg.lstsq(design, target).solution  # fitted f(x_t) = c0 + c1 x_t
    alpha, sigma = (c.item() for c in process.coefficients(t_one))
    probe = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None]
    posterior_mean = m + alpha * v * (probe - alpha * m) / (alpha**2 * v + sigma**2)
    expected = process.x0_to_prediction(posterior_mean, probe, t_one.expand(7))
    torch.testing.assert_close(coef[0] + coef[1] * probe, expected, atol=0.02, rtol=0.0)


def test_timestep_sampling_ddpm_uniform_table_and_reproducible():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    process = ForwardProcess.from_scheduler(scheduler)
    t = process.sample_timesteps(5000, torch.Generator().manual_seed(0), TimestepSampling(low=0.2, high=0.5))
    assert t.dtype == torch.int64 and int(t.min()) == 20 and int(t.max()) == 49  # ceil(0.2 * 99), floor(0.5 * 99)
    counts = torch.bincount(t - 20, minlength=30).double()
    assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()  # ~uniform (mean 167)
    again = process.sample_timesteps(5000, torch.Generator().manual_seed(0), TimestepSampling(low=0.2, high=0.5))
    assert torch.equal(t, again)
    scheduler.set_timesteps(10)
    table = ForwardProcess.from_scheduler(scheduler)
    drawn = table.sample_timesteps(400, torch.Generator().manual_seed(1), TimestepSampling("table", 0.0, 0.5))
    grid = set(scheduler.timesteps.tolist())
    assert set(drawn.tolist()) == {x for x in grid if x <= 49.5}


def test_timestep_sampling_flow_never_draws_sigma_zero():
    process = ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    t = process.sample_timesteps(10_000, torch.Generator().manual_seed(0), TimestepSampling(low=0.0, high=0.4))
    sigma = t.double() / 1000
    assert t.dtype == torch.float32 and float(sigma.min()) > 0.0 and float(sigma.max()) <= 0.4 + 1e-6
    assert abs(float(sigma.mean()) - 0.2) < 0.01


def test_forward_noise_and_residual_spaces():
    process = ForwardProcess.from_scheduler(DDPMScheduler(num_train_timesteps=50, prediction_type="epsilon"))
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    batch = forward_noise(process, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(batch.x_t, process.add_noise(x0, batch.noise, batch.timesteps))
    prediction = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    eps_residual = regression_residual(process, prediction, batch, "prediction")
    torch.testing.assert_close(eps_residual, prediction - batch.noise)
    alpha, sigma = (c.float()[:, None] for c in process.coefficients(batch.timesteps))
    x0_residual = regression_residual(process, prediction, batch, "x0")
    torch.testing.assert_close(x0_residual, -sigma / alpha * eps_residual, atol=1e-5, rtol=1e-5)  # b_t = -sigma/alpha


def test_prediction_gap_by_hand_and_gradient_only_through_the_prediction():
    prediction = torch.tensor([[1.0, 2.0], [0.0, -1.0]], requires_grad=True)
    reference = torch.tensor([[0.0, 4.0], [0.0, -1.0]], requires_grad=True)
    gap = prediction_gap(prediction, reference)
    torch.testing.assert_close(gap, torch.tensor([2.5, 0.0]))  # (1 + 4) / 2, 0
    gap.sum().backward()
    torch.testing.assert_close(prediction.grad, torch.tensor([[1.0, -2.0], [0.0, 0.0]]))  # 2 (f - f_ref) / D
    assert reference.grad is None
    assert float(prediction_gap(prediction.detach(), prediction.detach()).abs().max()) == 0.0


@pytest.mark.unchecked_annotations
def test_bad_inputs_raise_clear_errors():
    ddpm = ForwardProcess.from_scheduler(DDPMScheduler(num_train_timesteps=50))
    with pytest.raises(ValueError, match="integers in"):
        ddpm.coefficients(torch.tensor([50]))
    with pytest.raises(ValueError, match="low < high"):
        TimestepSampling(low=0.5, high=0.5)
    with pytest.raises(ValueError, match="one t per element"):
        ddpm.add_noise(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([1, 2]))
    flow = ForwardProcess.from_scheduler(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="sigma_t = 0"):
        flow.x0_to_prediction(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="unsupported scheduler"):
        ForwardProcess.from_scheduler(object())
