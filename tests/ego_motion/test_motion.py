"""Tests of the packed motion layout, loss weights, timestep weights and sampling schedule."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from tasks.ego_motion.body.geometry import axis_angle_to_matrix
from tasks.ego_motion.model.motion import (
    BETAS,
    BODY_ROTMATS,
    CONTACTS,
    HAND_ROTMATS,
    MOTION_DIM,
    MOTION_DIM_WITH_HANDS,
    MotionSample,
    loss_weights,
    modality_slices,
    motion_dim,
    sampling_timesteps,
    timestep_loss_weights,
)


def _random_sample(lead: tuple[int, ...], include_hands: bool, gen: torch.Generator) -> MotionSample:
    rot = lambda j: axis_angle_to_matrix(torch.randn(*lead, j, 3, generator=gen, dtype=torch.float64))
    return MotionSample(
        betas=torch.randn(*lead, 16, generator=gen, dtype=torch.float64),
        body_rotmats=rot(21),
        contacts=torch.rand(*lead, 21, generator=gen, dtype=torch.float64),
        hand_rotmats=rot(30) if include_hands else None,
    )


def test_layout_sizes_and_contiguity():
    assert (MOTION_DIM, MOTION_DIM_WITH_HANDS) == (226, 496)
    assert [s.stop - s.start for s in (BETAS, BODY_ROTMATS, CONTACTS, HAND_ROTMATS)] == [16, 189, 21, 270]
    for include_hands in (False, True):
        slices = list(modality_slices(include_hands).values())
        assert slices[0].start == 0 and slices[-1].stop == motion_dim(include_hands)
        assert all(a.stop == b.start for a, b in zip(slices[:-1], slices[1:], strict=True))


@pytest.mark.parametrize("include_hands", [False, True])
def test_pack_unpack_round_trip(include_hands: bool):
    gen = torch.Generator().manual_seed(0)
    sample = _random_sample((2, 3, 5), include_hands, gen)
    x = sample.pack()
    assert x.shape == (2, 3, 5, motion_dim(include_hands))
    back = MotionSample.unpack(x, include_hands=include_hands)
    assert torch.equal(back.betas, sample.betas)
    assert torch.equal(back.body_rotmats, sample.body_rotmats)
    assert torch.equal(back.contacts, sample.contacts)
    if include_hands:
        assert torch.equal(back.hand_rotmats, sample.hand_rotmats)
    else:
        assert back.hand_rotmats is None
    assert torch.equal(back.pack(), x)
    # Row-major layout: entry (j, r, c) of the rotations sits at 16 + 9 j + 3 r + c.
    assert x[1, 2, 4, 16 + 9 * 7 + 3 * 2 + 1] == sample.body_rotmats[1, 2, 4, 7, 2, 1]


def test_projection_gives_rotations_and_keeps_rotations():
    gen = torch.Generator().manual_seed(1)
    sample = _random_sample((4, 8), True, gen)
    x = sample.pack()
    x_noisy = x + 0.3 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    projected = MotionSample.unpack(x_noisy, include_hands=True, project_rotations=True)
    for R in (projected.body_rotmats, projected.hand_rotmats):
        eye = torch.eye(3, dtype=R.dtype).expand_as(R)
        assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-10)
        assert torch.allclose(torch.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=1e-10)
    # Exact rotations are fixed points of the projection.
    clean = MotionSample.unpack(x, include_hands=True, project_rotations=True)
    assert torch.allclose(clean.body_rotmats, sample.body_rotmats, atol=1e-10)
    # A reflection is mapped to a proper rotation (det +1), not kept.
    reflected = x.clone()
    reflected[..., BODY_ROTMATS] *= -1.0
    R = MotionSample.unpack(reflected, include_hands=True, project_rotations=True).body_rotmats
    assert torch.allclose(torch.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=1e-10)


def test_projection_in_bfloat16_and_contact_clamp():
    x = torch.randn(2, 4, MOTION_DIM).to(torch.bfloat16)
    out = MotionSample.unpack(x, include_hands=False, project_rotations=True, clamp_contacts=True)
    assert out.body_rotmats.dtype == torch.bfloat16
    assert out.contacts.min() >= 0.0 and out.contacts.max() <= 1.0
    raw = MotionSample.unpack(x, include_hands=False)
    assert torch.equal(raw.contacts, x[..., CONTACTS])


@pytest.mark.unchecked_annotations
def test_wrong_sizes_raise_with_a_hint():
    with pytest.raises(ValueError, match="include_hands=True"):
        MotionSample.unpack(torch.zeros(3, MOTION_DIM_WITH_HANDS), include_hands=False)
    with pytest.raises(ValueError, match="contacts"):
        MotionSample(torch.zeros(5, 16), torch.zeros(5, 21, 3, 3), torch.zeros(4, 21))


def test_loss_weights_values():
    w = loss_weights(include_hands=False)
    assert w.shape == (226,)
    assert w[0] == pytest.approx(0.1) and w[15] == pytest.approx(0.1 / 16)
    assert w[BETAS].diff().lt(0).all()
    assert w[16] == 1.0 and w[204] == 1.0
    assert w[205] == pytest.approx(0.1) and w[225] == pytest.approx(0.1)
    wh = loss_weights(include_hands=True)
    assert wh.shape == (496,)
    assert torch.equal(wh[:226], w)
    assert wh[226] == pytest.approx(0.01) and wh[495] == pytest.approx(0.01)


def _cosine_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")


def test_timestep_weights():
    abar = _cosine_scheduler().alphas_cumprod
    raw = timestep_loss_weights(abar, floor=0.0)
    assert raw.shape == (1000,)
    assert raw[0] == 1.0  # EgoAllo's t = 1 is alphas_cumprod[0]
    assert raw.diff().lt(0).all()  # less weight as noise grows
    assert torch.allclose(raw[1], (abar[1] / (1 - abar[1])) / (abar[0] / (1 - abar[0])))
    mixed = timestep_loss_weights(abar)
    assert torch.allclose(mixed, 0.99 * raw + 0.01)
    assert mixed[0] == pytest.approx(1.0) and mixed[-1] == pytest.approx(0.01, abs=1e-6)


def test_sampling_timesteps():
    t = sampling_timesteps()
    assert t.shape == (31,) and t.dtype == torch.long
    assert t[:4].tolist() == [1000, 841, 784, 729]
    assert t[-3:].tolist() == [4, 1, 0]
    assert t.diff().lt(0).all()
    d = sampling_timesteps(convention="diffusers")
    assert torch.equal(d, t - 1) and d[0] == 999 and d[-1] == -1
    with pytest.raises(ValueError, match=r"num_steps=43 must be an int in \[1, 42\]"):
        sampling_timesteps(43, 1000)


@pytest.mark.parametrize("num_steps", [1, 5, 10, 20, 42])
def test_sampling_timesteps_keep_the_reference_shape(num_steps):
    """Any K resamples EgoAllo's k^2 grid (issue 11, item 6: K = 10 used to jump 1000 -> 81)."""
    t = sampling_timesteps(num_steps).double()
    assert t.diff().lt(0).all() and t[0] == 1000 and t[-1] == 0
    # Below the raised first entry, t_k / 900 = (k / K)^2 for every K, up to rounding.
    k = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    assert torch.allclose(t[1:] / 900.0, (k[1:] / num_steps) ** 2, atol=0.5 / 900.0)
    if num_steps == 10:
        assert t.tolist() == [1000, 729, 576, 441, 324, 225, 144, 81, 36, 9, 0]


def test_feature_range_of_adjacent_modalities_and_errors():
    from tasks.ego_motion.model.motion import BODY_ROTMATS, CONTACTS, feature_range

    assert feature_range(("body_rotmats",), include_hands=False) == (BODY_ROTMATS.start, BODY_ROTMATS.stop)
    assert feature_range(("contacts", "body_rotmats"), include_hands=False) == (BODY_ROTMATS.start, CONTACTS.stop)
    with pytest.raises(ValueError, match="not adjacent"):
        feature_range(("betas", "contacts"), include_hands=False)
    with pytest.raises(ValueError, match="unknown without hands"):
        feature_range(("hand_rotmats",), include_hands=False)
