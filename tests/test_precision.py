"""Mixed precision: bf16 detection, the "auto" resolver, fp32 attention inside autocast, and the
on-policy ratio staying exact in every precision mode on the ego-motion denoiser."""

from __future__ import annotations

import dataclasses
import logging
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.nn import functional as F

import tasks.ego_motion.rewards.registered  # noqa: F401  (registers the ego_* rewards)
from diffgrpo import precision
from diffgrpo.config import GRPOConfig, PerturbConfig
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import make_generator
from diffgrpo.run_state import make_optimizer
from diffgrpo.train_step import collect, make_perturber, policy_update
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser
from tasks.ego_motion.task import EgoMotionTask, EgoMotionTaskConfig

X86_AMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16\n"
X86_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\nflags\t\t: avx512_bf16\n"
ARM_WITH_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"


# -- detection and the resolver -------------------------------------------------------------------


def test_cpu_flags_read_the_first_processor_on_x86_and_arm():
    assert {"avx512_bf16", "amx_bf16"} <= precision.cpu_flags(X86_AMX)
    assert precision.cpu_flags(X86_WITHOUT) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw"}
    assert "bf16" in precision.cpu_flags(ARM_WITH_BF16)
    assert precision.cpu_flags("model name\t: something\n") == frozenset()


def test_native_bf16_and_where_it_pays():
    for native in (X86_AMX, X86_AVX512_BF16, ARM_WITH_BF16):
        assert precision.cpu_has_native_bf16(native)
        assert precision.has_native_bf16("cpu", cpuinfo=native)
    assert not precision.cpu_has_native_bf16(X86_WITHOUT)  # "avx512bw" is not bf16 arithmetic
    assert not precision.has_native_bf16("meta", cpuinfo=X86_AMX)  # neither CPU nor CUDA
    assert precision.cpu_bf16_pays(X86_AMX)
    for slow in (X86_AVX512_BF16, X86_WITHOUT, ARM_WITH_BF16):
        assert not precision.cpu_bf16_pays(slow)


def test_auto_picks_bf16_only_where_it_pays():
    assert precision.resolve_mixed_precision("auto", "cpu", cpuinfo=X86_AMX) == "bf16"
    for cpuinfo in (X86_AVX512_BF16, X86_WITHOUT, ARM_WITH_BF16):
        assert precision.resolve_mixed_precision("auto", torch.device("cpu"), cpuinfo=cpuinfo) == "no"
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", return_value=False) as supported:
        assert precision.resolve_mixed_precision("auto", "cuda", cpuinfo=X86_AMX) == "no"  # e.g. a V100
        supported.assert_called_once_with(including_emulation=False)
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", return_value=True):
        assert precision.resolve_mixed_precision("auto", "cuda:0", cpuinfo=X86_WITHOUT) == "bf16"
    with mock.patch.object(torch.cuda, "is_available", return_value=False):  # None: the default device, here the CPU
        assert precision.resolve_mixed_precision("auto", cpuinfo=X86_AMX) == "bf16"
        assert precision.resolve_mixed_precision("auto", cpuinfo=X86_AVX512_BF16) == "no"
    for explicit in ("no", "fp16", "bf16"):
        assert precision.resolve_mixed_precision(explicit, "cpu", cpuinfo=X86_AMX) == explicit


def test_bf16_on_a_cpu_where_it_does_not_pay_warns_and_bad_values_raise(caplog):
    for cpuinfo, reason in ((X86_AVX512_BF16, "AVX512-BF16 without AMX"), (X86_WITHOUT, "emulated")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffgrpo.precision"):
            assert precision.resolve_mixed_precision("bf16", "cpu", cpuinfo=cpuinfo) == "bf16"
        assert reason in caplog.text and "slower than fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffgrpo.precision"):
        precision.resolve_mixed_precision("bf16", "cpu", cpuinfo=X86_AMX)
    assert caplog.text == ""
    with pytest.raises(ValueError, match="'bfloat16' is not one of.*auto"):
        precision.resolve_mixed_precision("bfloat16", "cpu")


# -- fp32 attention inside autocast -----------------------------------------------------------------


def test_attention_policy_and_its_numerics():
    assert precision.attention_in_float32("cpu") and not precision.attention_in_float32("cuda")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 1, 9, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    # Outside autocast: the plain call, bit for bit.
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(precision.scaled_dot_product_attention(q, k, v, mask), plain)
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))  # what a bf16 linear layer hands over
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = precision.scaled_dot_product_attention(q16, k16, v16, mask)
        native = F.scaled_dot_product_attention(q16, k16, v16, attn_mask=mask)
    assert out.dtype == native.dtype == torch.bfloat16
    # fp32 attention of the same bf16 inputs, rounded once to bf16: within bf16's unit roundoff (2^-8 relative).
    reference = F.scaled_dot_product_attention(q16.float(), k16.float(), v16.float(), attn_mask=mask)
    assert torch.equal(out, reference.bfloat16())
    assert ((out.float() - reference).abs() <= 2.0**-8 * reference.abs() + 1e-30).all()
    assert (out.float() - reference).abs().max() <= (native.float() - reference).abs().max()


def test_denoiser_under_autocast_with_fp32_attention_stays_close_to_fp32():
    torch.manual_seed(0)
    model = MotionDenoiser(dataclasses.replace(DenoiserConfig.demo(), width=32, ff_dim=64, num_encoder_layers=1,
                                               num_decoder_layers=1))
    x_t, t, cond = torch.randn(2, 12, 226), torch.tensor([999, 400]), torch.randn(2, 12, 154)
    full = model(x_t, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(x_t, t, cond)
    mixed.float().square().mean().backward()
    assert mixed.dtype == torch.bfloat16
    # bf16 carries 8 bits of mantissa: the x0 estimate (entries of order 1) moves by a few 2^-8 at most.
    assert (mixed.float() - full).abs().max() < 0.05 * full.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- the on-policy ratio is exact in every mode ---------------------------------------------------


@pytest.fixture(scope="module")
def ego_task(tmp_path_factory) -> EgoMotionTask:
    return EgoMotionTask(EgoMotionTaskConfig(window_frames=16, cache_dir=tmp_path_factory.mktemp("cache")),
                         body=load_body_model())


@pytest.mark.parametrize(("mixed_precision", "fp32_attention"), [("no", True), ("bf16", True), ("bf16", False)])
def test_first_update_reproduces_the_rollout_log_probs_exactly(ego_task, mixed_precision, fp32_attention):
    torch.manual_seed(0)
    model = MotionDenoiser(dataclasses.replace(DenoiserConfig.demo(), width=32, ff_dim=64, num_encoder_layers=1,
                                               num_decoder_layers=1))
    cfg = GRPOConfig(num_iterations=1, conditions_per_iteration=2, group_size=2, micro_batch_size=4,
                     rewards=("ego_pos",),
                     perturb=PerturbConfig("gaussian", scale=0.01), mixed_precision=mixed_precision)
    AcceleratorState._reset_state(reset_partial_state=True)  # each case builds its own precision
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    optimizer, _ = make_optimizer(model, cfg)
    attended = mock.Mock(wraps=F.scaled_dot_product_attention)  # records the dtype attention really ran in
    with mock.patch.object(precision, "attention_in_float32", return_value=fp32_attention), \
            mock.patch.object(precision.F, "scaled_dot_product_attention", attended):
        chain = ego_task.sampling_chain()
        data = collect(ego_task, model, chain, ego_task.load_examples("test", torch.arange(2)),
                       cfg=cfg, rewards=RewardSet.from_specs({"ego_pos": 1.0}), perturber=make_perturber(cfg),
                       generator=make_generator(0, "rollout"), group_id_offset=0, autocast=accelerator.autocast)
        stats = policy_update(ego_task, model, chain, data, optimizer, cfg=cfg,
                              generator=make_generator(0, "select"), accelerator=accelerator)
    AcceleratorState._reset_state(reset_partial_state=True)
    assert torch.isfinite(data.trajectory.log_probs).all()
    expected = torch.bfloat16 if mixed_precision == "bf16" and not fp32_attention else torch.float32
    assert {c.args[0].dtype for c in attended.call_args_list} == {expected}
    assert stats["loss/on_policy_ratio_max_dev"] == 0.0
