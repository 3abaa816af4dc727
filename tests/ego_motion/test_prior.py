"""Tests of the prior's training loss and of the pretraining recipe (docs/ego_motion_prior.md)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tasks.ego_motion.pretrain as pretrain_job
from tasks.ego_motion.data.sequences import WindowConfig
from tasks.ego_motion.data.windows import load_windows
from tasks.ego_motion.model.motion import BETAS, BODY_ROTMATS, CONTACTS, MotionSample
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser
from tasks.ego_motion.model.prior import batch_to_motion, diffusion_loss, make_scheduler

REPO = Path(__file__).resolve().parents[2]
WINDOW = 32


@pytest.fixture(scope="module")
def windows():
    return load_windows("train", config=WindowConfig(window_frames=WINDOW))


@pytest.fixture(scope="module")
def recipe():
    return pretrain_job


class FixedError(nn.Module):
    """A stand-in 'network' whose x0 prediction is the true x0 plus a known error."""

    def __init__(self, x0: torch.Tensor, error: torch.Tensor):
        super().__init__()
        self.x0, self.error = x0, error

    def forward(self, x_t, t, cond):
        assert cond.shape == (*x_t.shape[:2], 154)
        return self.x0 + self.error


def test_batch_to_motion_packs_the_window(windows):
    batch = windows.get([3, 7])
    x0 = batch_to_motion(batch)
    assert x0.shape == (2, WINDOW, 226)
    back = MotionSample.unpack(x0, include_hands=False)
    assert torch.equal(back.body_rotmats, batch["body_rotmats"])
    assert torch.equal(back.contacts, batch["contacts"])
    assert torch.equal(back.betas, batch["betas"][:, None].expand(2, WINDOW, 16))  # repeated per frame


def test_loss_weighting_matches_method_on_a_hand_made_case(windows):
    """Unit error everywhere: each term is its weight (betas: 0.1 * mean 1/(i+1)) times w_t."""
    scheduler = make_scheduler()
    batch = windows.get([0, 1])
    x0 = batch_to_motion(batch)
    model = FixedError(x0, torch.ones_like(x0))
    harmonic_16 = sum(1.0 / (i + 1) for i in range(16))

    # t index 0 is EgoAllo's t = 1, whose weight is exactly 1 after normalisation.
    out = diffusion_loss(model, scheduler, batch, None, timesteps=torch.tensor([0, 0]), noise=torch.zeros_like(x0))
    assert out.terms["betas"].item() == pytest.approx(0.1 * harmonic_16 / 16, rel=1e-6)
    assert out.terms["body_rotmats"].item() == pytest.approx(1.0, rel=1e-6)
    assert out.terms["contacts"].item() == pytest.approx(0.1, rel=1e-6)
    assert out.loss.item() == pytest.approx(1.1 + 0.1 * harmonic_16 / 16, rel=1e-6)

    # Mid-schedule: w = 0.99 snr_t / snr_1 + 0.01 from the cosine schedule in closed form,
    # abar(i) = f(i + 1) / f(0) with f(u) = cos^2((u / 1000 + 0.008) / 1.008 * pi / 2).
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    snr = lambda i: (f(i + 1) / f(0)) / (1 - f(i + 1) / f(0))
    w_499 = 0.99 * snr(499) / snr(0) + 0.01
    assert 0.01 < w_499 < 0.02  # the floor dominates away from t = 1
    error = torch.zeros_like(x0)
    error[..., BODY_ROTMATS] = 2.0  # only rotations wrong, squared error 4
    out = diffusion_loss(FixedError(x0, error), scheduler, batch, None, timesteps=torch.tensor([499, 0]),
                         noise=torch.zeros_like(x0))
    assert out.terms["body_rotmats"].item() == pytest.approx(4.0 * (w_499 + 1.0) / 2, rel=1e-4)
    assert out.terms["betas"].item() == 0.0 and out.terms["contacts"].item() == 0.0

    # One wrong beta coefficient i carries 0.1 / (i + 1); one wrong contact 0.1.
    error = torch.zeros_like(x0)
    error[..., BETAS.start + 3] = 1.0
    error[..., CONTACTS.start + 5] = 1.0
    out = diffusion_loss(FixedError(x0, error), scheduler, batch, None, timesteps=torch.tensor([0, 0]),
                         noise=torch.zeros_like(x0))
    assert out.terms["betas"].item() == pytest.approx(0.1 / 4 / 16, rel=1e-6)
    assert out.terms["contacts"].item() == pytest.approx(0.1 / 21, rel=1e-6)


def test_noising_follows_the_cosine_schedule(windows):
    """The network sees x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at the drawn diffusers index."""
    scheduler = make_scheduler()
    batch = windows.get([5])
    x0 = batch_to_motion(batch)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    seen = {}

    def spy(x_t, t, cond):
        seen["x_t"], seen["t"] = x_t, t
        return x_t

    diffusion_loss(spy, scheduler, batch, None, timesteps=torch.tensor([300]), noise=noise)
    abar = scheduler.alphas_cumprod[300].item()
    assert seen["t"].tolist() == [300]
    torch.testing.assert_close(seen["x_t"], math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise)


def test_tiny_model_overfits_one_window(windows):
    """Fixed timesteps and noise on one real window: the weighted x0 loss falls tenfold."""
    torch.manual_seed(0)
    model = MotionDenoiser(DenoiserConfig(width=32, ff_dim=64, num_heads=2, num_encoder_layers=1,
                                          num_decoder_layers=1, timestep_features=16))
    scheduler = make_scheduler()
    batch = windows.get([10] * 4)
    timesteps = torch.tensor([0, 30, 200, 600])
    noise = torch.randn(4, WINDOW, 226, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        out = diffusion_loss(model, scheduler, batch, None, timesteps=timesteps, noise=noise)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_loss_draws_come_from_the_generator(windows):
    torch.manual_seed(0)
    model = MotionDenoiser(DenoiserConfig(width=32, ff_dim=64, num_heads=2, num_encoder_layers=1,
                                          num_decoder_layers=1, timestep_features=16))
    batch = windows.get([0, 1, 2])
    run = lambda seed: diffusion_loss(model, make_scheduler(), batch, torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.timesteps, b.timesteps) and a.loss.item() == b.loss.item()
    assert a.loss.item() != c.loss.item()
    assert a.loss.item() == pytest.approx(sum(v.item() for v in a.terms.values()), rel=1e-6)


def test_recipe_resume_is_bit_exact(recipe, tmp_path):
    """N steps straight == N/2 steps, then --resume to N: identical weights and loss curve."""
    base = dict(preset="tiny", steps=6, batch_size=4, window_frames=WINDOW, checkpoint_every=3, log_every=1,
                eval_windows=0, use_progress_bar=False, num_threads=1)
    straight = recipe.main(recipe.Config(**base, output_dir=tmp_path / "a"))
    recipe.main(recipe.Config(**{**base, "steps": 3}, output_dir=tmp_path / "b"))
    resumed = recipe.main(recipe.Config(**base, output_dir=tmp_path / "b", resume=True))
    a = load_file(str(tmp_path / "a" / "denoiser.safetensors"))
    b = load_file(str(tmp_path / "b" / "denoiser.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight["history"]["loss/total"] == resumed["history"]["loss/total"]
    assert len(straight["history"]["loss/total"]) == 6
    # Training moved the weights away from the seeded initialisation.
    torch.manual_seed(0)
    init = recipe.Config(preset="tiny").denoiser_config()
    assert not torch.equal(MotionDenoiser(init).state_dict()["cond_in.0.weight"], a["cond_in.0.weight"])
