"""Tests of the EgoAllo-style denoiser: shapes, size, RoPE, conditioning, training, saving."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tasks.ego_motion.model.network import (
    DenoiserConfig,
    MotionDenoiser,
    RotaryAttention,
    apply_rope,
    load_denoiser,
    rope_cos_sin,
    save_denoiser,
)

TINY = DenoiserConfig(
    width=32, ff_dim=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, cond_dim=10, timestep_features=16
)


def _inputs(cfg: DenoiserConfig, B: int, T: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, T, cfg.motion_dim, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    cond = torch.randn(B, T, cfg.cond_dim, generator=gen)
    return x_t, t, cond


def _model(cfg: DenoiserConfig, seed: int = 0) -> MotionDenoiser:
    torch.manual_seed(seed)
    return MotionDenoiser(cfg)


@pytest.mark.parametrize("include_hands", [False, True])
@pytest.mark.parametrize("T", [1, 7, 20])
def test_output_shape(include_hands: bool, T: int):
    cfg = dataclasses.replace(TINY, include_hands=include_hands)
    x_t, t, cond = _inputs(cfg, 3, T)
    out = _model(cfg)(x_t, t.float(), cond)
    assert out.shape == (3, T, 496 if include_hands else 226)
    assert torch.isfinite(out).all()


def test_preset_sizes():
    with torch.device("meta"):  # no memory, no init time
        reference = MotionDenoiser(DenoiserConfig.reference()).num_parameters()
        demo = MotionDenoiser(DenoiserConfig.demo()).num_parameters()
    assert 40e6 <= reference <= 60e6
    assert demo < 2e6
    assert DenoiserConfig.reference() == DenoiserConfig()


def test_rope_scores_depend_only_on_offset():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=gen, dtype=torch.float64).unbind(0)

    def score(m: float, n: float) -> torch.Tensor:
        cos, sin = rope_cos_sin(torch.tensor([m, n]), 16)
        rq = apply_rope(q[None, None, None], cos[:1].double(), sin[:1].double())
        rk = apply_rope(k[None, None, None], cos[1:].double(), sin[1:].double())
        return (rq * rk).sum()

    for m, n in [(0, 0), (3, 1), (1, 3), (10, 0)]:
        for shift in (1.0, 7.0, 123.0):
            assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(1, 3))  # the direction of the offset matters
    # Position 0 is the identity rotation: the dot product is unchanged.
    assert torch.allclose(score(0, 0), (q * k).sum())


def test_attention_is_translation_invariant():
    torch.manual_seed(0)
    attn = RotaryAttention(32, 4)
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)
    out = attn(x, rope_cos_sin(pos, 8))
    out_shifted = attn(x, rope_cos_sin(pos + 50, 8))
    assert torch.allclose(out, out_shifted, atol=1e-5)


def test_timestep_and_condition_change_the_output():
    model = _model(TINY)
    x_t, t, cond = _inputs(TINY, 2, 6)
    out = model(x_t, t, cond)
    assert not torch.allclose(out, model(x_t, t + 100, cond), atol=1e-4)
    assert not torch.allclose(out, model(x_t, t, cond + 1.0), atol=1e-4)
    # Each sample reads its own timestep: changing sample 1's leaves sample 0 alone.
    t2 = t.clone()
    t2[1] += 100
    out2 = model(x_t, t2, cond)
    assert torch.allclose(out[0], out2[0]) and not torch.allclose(out[1], out2[1], atol=1e-4)


def test_padding_mask_hides_padded_frames():
    model = _model(TINY)
    x_t, t, cond = _inputs(TINY, 2, 10)
    x_pad, _, cond_pad = _inputs(TINY, 2, 14, seed=1)
    x_pad[:, :10], cond_pad[:, :10] = x_t, cond
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[:, :10] = True
    out = model(x_t, t, cond)
    out_pad = model(x_pad, t, cond_pad, attn_mask=mask)
    assert torch.allclose(out, out_pad[:, :10], atol=1e-5)


def test_deterministic_in_train_mode_and_pre_norm_variant():
    for placement in ("post", "pre"):
        cfg = dataclasses.replace(TINY, norm_placement=placement)
        model = _model(cfg)
        x_t, t, cond = _inputs(cfg, 2, 5)
        a = model.train()(x_t, t, cond)
        b = model.eval()(x_t, t, cond)
        assert torch.equal(a, b)


def test_bf16_autocast():
    model = _model(TINY)
    x_t, t, cond = _inputs(TINY, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_t, t, cond)
    assert out.shape == (2, 8, 226) and torch.isfinite(out).all()
    assert torch.allclose(out.float(), model(x_t, t, cond), atol=0.1)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_overfits_a_single_window():
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, width=64, ff_dim=128, num_heads=4)
    model = MotionDenoiser(cfg)
    x_t, t, cond = _inputs(cfg, 1, 16)
    x0 = torch.randn(1, 16, cfg.motion_dim, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = (model(x_t, t, cond) - x0).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_save_load_round_trip(tmp_path):
    cfg = dataclasses.replace(TINY, include_hands=True, norm_placement="pre", rope_base=500.0)
    model = _model(cfg)
    path = tmp_path / "denoiser.safetensors"
    save_denoiser(path, model)
    loaded = load_denoiser(path)
    assert loaded.config == cfg
    x_t, t, cond = _inputs(cfg, 2, 6)
    assert torch.equal(model(x_t, t, cond), loaded(x_t, t, cond))


@pytest.mark.unchecked_annotations
def test_config_dict_round_trip_and_errors():
    for cfg in (DenoiserConfig.reference(), DenoiserConfig.demo(include_hands=True)):
        assert DenoiserConfig.from_dict(cfg.to_dict()) == cfg
    assert isinstance(DenoiserConfig.from_dict({"rope_base": 100}).rope_base, float)
    with pytest.raises(ValueError, match="unknown DenoiserConfig keys"):
        DenoiserConfig.from_dict({"widht": 64})
    with pytest.raises(TypeError, match="width"):
        DenoiserConfig.from_dict({"width": "64"})
    with pytest.raises(TypeError, match="include_hands"):
        DenoiserConfig.from_dict({"include_hands": 1})
    with pytest.raises(ValueError, match="num_heads"):
        DenoiserConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="norm_placement"):
        DenoiserConfig(norm_placement="sandwich")  # type: ignore[arg-type]


@pytest.mark.unchecked_annotations
def test_bad_inputs_raise():
    model = _model(TINY)
    x_t, t, cond = _inputs(TINY, 2, 5)
    with pytest.raises(ValueError, match="include_hands"):
        model(torch.zeros(2, 5, 496), t, cond)
    with pytest.raises(ValueError, match="cond_dim"):
        model(x_t, t, cond[:, :4])
    with pytest.raises(ValueError, match="one timestep per sample"):
        model(x_t, t[:1], cond)
    with pytest.raises(ValueError, match="attn_mask"):
        model(x_t, t, cond, attn_mask=torch.ones(2, 5))
