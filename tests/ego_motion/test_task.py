"""EgoMotionTask: the Task protocol, the head-translation condition, decoding and metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffgrpo.task import Task, repeat_batch
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.body.geometry import HEAD_JOINT, axis_angle_to_matrix
from tasks.ego_motion.model.motion import MOTION_DIM
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser
from tasks.ego_motion.model.prior import batch_to_motion
from tasks.ego_motion.task import METRIC_UNITS, EgoMotionTask, EgoMotionTaskConfig

T = 64


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> EgoMotionTask:
    return EgoMotionTask(EgoMotionTaskConfig(window_frames=T, cache_dir=tmp_path_factory.mktemp("cache")),
                         body=load_body_model())


@pytest.fixture(scope="module")
def batch(task):
    return task.load_examples("test", torch.tensor([0, 3, 7]))


def test_implements_the_protocol_with_egoallo_schedule(task):
    assert isinstance(task, Task)
    assert task.sample_shape == (T, MOTION_DIM) == (T, 226)
    scheduler = task.make_scheduler()
    assert scheduler.config.prediction_type == "sample"
    t = task.sampling_timesteps()
    assert t.tolist()[:4] == [999, 840, 783, 728] and t.tolist()[-3:] == [3, 0, -1] and len(t) == 31
    sampler = task.sampler_config()
    assert (sampler.method, sampler.eta, sampler.egoallo_denominator_offset) == ("egoallo", 0.8, 0.1)
    plain = EgoMotionTaskConfig(use_egoallo_offset=False).sampler_config()
    assert plain.egoallo_denominator_offset == 0.0
    chain = task.sampling_chain()  # the evaluation chain: the task's scheduler, timesteps and sampler, built once
    assert torch.equal(chain.timesteps, t) and chain.sampler == sampler and chain.num_steps == 30
    assert task.sampling_chain() is chain
    short = task.sampling_chain(10, sde_window=(0, 4))  # a rollout chain of K = 10
    assert short.num_steps == 10 and short.sampler.sde_window == (0, 4) and short.sampler.eta == sampler.eta


def test_test_windows_are_not_mirrored_and_have_window_shapes(task, batch):
    assert task.num_examples("test") >= 8
    assert not batch["mirrored"].any()
    assert batch["T_world_cpf"].shape == (3, T + 1, 4, 4)
    assert batch["joints_world"].shape == (3, T, 22, 3)
    with pytest.raises(KeyError, match="unknown split"):
        task.num_examples("val")


def test_raw_condition_is_head_translation_and_perturbation_keeps_rotations(task, batch):
    raw = task.raw_condition(batch)
    assert raw.shape == (3, T + 1, 3)
    assert torch.equal(raw, batch["T_world_cpf"][..., :3, 3])
    before = batch["T_world_cpf"].clone()
    offset = torch.randn(raw.shape, generator=torch.Generator().manual_seed(0)) * 0.05
    perturbed = task.with_raw_condition(batch, raw + offset)
    assert torch.equal(batch["T_world_cpf"], before)  # the input batch is not modified
    assert torch.allclose(task.raw_condition(perturbed), raw + offset)
    assert torch.equal(perturbed["T_world_cpf"][..., :3, :3], before[..., :3, :3])
    assert torch.equal(perturbed["T_world_cpf"][..., 3, :], before[..., 3, :])
    assert all(perturbed[k] is batch[k] for k in batch if k != "T_world_cpf")
    with pytest.raises(ValueError, match=r"\(B, T\+1, 3\)"):
        task.with_raw_condition(batch, raw[:, :-1])


def test_encoding_ignores_a_horizontal_head_shift_but_not_a_vertical_one(task, batch):
    cond = task.encode_condition(batch)
    assert cond.shape == (3, T, 154)
    raw = task.raw_condition(batch)
    shifted = task.encode_condition(task.with_raw_condition(batch, raw + torch.tensor([0.7, -1.3, 0.0])))
    lifted = task.encode_condition(task.with_raw_condition(batch, raw + torch.tensor([0.0, 0.0, 0.2])))
    assert torch.allclose(shifted, cond, atol=1e-4)
    assert not torch.allclose(lifted, cond, atol=1e-2)


def test_decoding_the_ground_truth_reproduces_it(task, batch):
    decoded = task.decode(batch_to_motion(batch), batch)
    assert decoded["joints_world"].shape == (3, T, 22, 3)
    assert torch.allclose(decoded["joints_world"], batch["joints_world"], atol=1e-4)
    assert torch.allclose(decoded["T_world_root"], batch["T_world_root"], atol=1e-4)
    assert torch.equal(decoded["T_world_cpf"], batch["T_world_cpf"][:, 1:])  # motion frame t <-> head pose t+1
    values = task.evaluate(decoded, batch)
    assert list(values) == list(METRIC_UNITS)
    for name in ("mpjpe_mm", "pa_mpjpe_mm", "head_position_error_mm"):
        assert values[name].shape == (3,) and values[name].max() < 0.01, name
    assert values["mpjre_deg"].max() < 1e-2 and values["head_orientation_error_deg"].max() < 1e-2
    assert values["mpjve_mm_per_s"].max() < 1.0


def test_decoded_body_hangs_from_the_given_head(task, batch):
    """A rigid shift of the (perturbed) head moves every decoded joint by exactly that shift."""
    x0 = batch_to_motion(batch)
    shift = torch.tensor([0.3, -0.2, 0.05])
    moved = task.with_raw_condition(batch, task.raw_condition(batch) + shift)
    a, b = task.decode(x0, batch), task.decode(x0, moved)
    assert torch.allclose(b["joints_world"] - a["joints_world"], shift.expand_as(a["joints_world"]), atol=1e-5)
    # the FK head joint and the CPF offset reproduce the head poses the body was decoded on
    T_world_cpf = b["T_world_head"] @ task.body.T_head_cpf(b["betas"])[:, None]
    assert torch.allclose(T_world_cpf, moved["T_world_cpf"][:, 1:], atol=1e-4)
    assert task.evaluate(b, batch)["head_position_error_mm"].sub(shift.norm() * 1000).abs().max() < 0.05


def test_decode_projects_rotations_clamps_contacts_and_averages_betas(task, batch):
    gen = torch.Generator().manual_seed(1)
    x0 = batch_to_motion(batch) + 0.1 * torch.randn(3, T, MOTION_DIM, generator=gen)
    decoded = task.decode(x0, batch)
    R = decoded["body_rotmats"]
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-4) and (torch.linalg.det(R) > 0).all()
    assert decoded["contacts"].min() >= 0 and decoded["contacts"].max() <= 1
    assert torch.allclose(decoded["betas"], x0[..., :16].mean(1), atol=1e-6)
    worse = task.evaluate(decoded, batch)
    assert (worse["mpjre_deg"] > 1.0).all() and (worse["mpjpe_mm"] > 1.0).all()


def test_decode_x0_handles_per_step_predictions(task, batch):
    x0 = batch_to_motion(batch)
    noisy = x0 + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    steps = torch.stack([noisy, x0], dim=1)  # (B, K=2, T, D), like traj.x0_preds[:, -2:]
    decoded = task.decode_x0(steps, batch)
    assert decoded["joints_world"].shape == (3, 2, T, 22, 3)
    single = task.decode(noisy, batch)
    assert torch.allclose(decoded["joints_world"][:, 0], single["joints_world"], atol=1e-5)
    assert torch.allclose(decoded["joints_world"][:, 1], batch["joints_world"], atol=1e-4)


def test_predict_calls_the_denoiser_and_checks_shapes(task, batch):
    torch.manual_seed(0)
    model = MotionDenoiser(DenoiserConfig(width=16, ff_dim=32, num_heads=2, num_encoder_layers=1,
                                          num_decoder_layers=1, timestep_features=8)).eval()
    grouped = repeat_batch(batch, 2)  # (6, ...)
    x_t = torch.randn(6, T, MOTION_DIM, generator=torch.Generator().manual_seed(3))
    t = torch.full((6,), 500)
    cond = task.encode_condition(grouped)
    assert torch.equal(task.predict(model, x_t, t, cond), model(x_t, t, cond))
    with pytest.raises(ValueError, match="expected"):
        task.predict(model, x_t[:, :10], t, cond)


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="window-frames"):
        EgoMotionTaskConfig(window_frames=2)
    with pytest.raises(ValueError, match=r"num_sampling_steps=43 must be in \[1, 42\]"):
        EgoMotionTaskConfig(num_sampling_steps=43)


def test_mpjre_sees_a_rotated_joint(task, batch):
    """Rotating one joint of the ground truth by 30 degrees gives MPJRE = 30 / 21 degrees."""
    rotmats = batch["body_rotmats"].clone()
    turn = axis_angle_to_matrix(torch.tensor([0.0, 0.0, torch.pi / 6]))
    rotmats[:, :, HEAD_JOINT - 1] = rotmats[:, :, HEAD_JOINT - 1] @ turn
    decoded = task.decode(batch_to_motion({**batch, "body_rotmats": rotmats}), batch)
    assert torch.allclose(task.evaluate(decoded, batch)["mpjre_deg"], torch.full((3,), 30.0 / 21), atol=1e-3)


def test_floor_contact_keeps_exactly_the_windows_whose_feet_stay_on_the_floor(task):
    floored = EgoMotionTask(dataclasses.replace(task.cfg, floor_contact_m=0.1), body=task.body)
    everything = task.load_examples("post_train", torch.arange(task.num_examples("post_train")))
    lowest = everything["joints_world"][:, :, [7, 8, 10, 11], 2].amin(dim=2)  # (N, T)
    expected = torch.nonzero((lowest <= 0.1).double().mean(dim=1) >= 0.9).flatten()
    assert 0 < floored.num_examples("post_train") == len(expected) < task.num_examples("post_train")
    kept = floored.load_examples("post_train", torch.arange(len(expected)))
    torch.testing.assert_close(kept["joints_world"], everything["joints_world"][expected])
    with pytest.raises(ValueError, match="floor-contact-m"):
        EgoMotionTask(dataclasses.replace(task.cfg, floor_contact_m=-0.5), body=task.body)


def test_floor_frame_fraction_sets_how_many_frames_must_be_near_the_floor(task):
    """At a fraction <= 1 / T the filter keeps a window near the floor at any one frame (the earlier rule); a larger
    fraction keeps a subset of those; the config rejects fractions outside (0, 1]."""
    everything = task.load_examples("post_train", torch.arange(task.num_examples("post_train")))
    lowest = everything["joints_world"][:, :, [7, 8, 10, 11], 2].amin(dim=2)  # (N, T)
    any_frame = torch.nonzero(lowest.amin(dim=1) <= 0.1).flatten()
    loose = EgoMotionTask(dataclasses.replace(task.cfg, floor_contact_m=0.1, floor_frame_fraction=1e-6),
                          body=task.body)
    torch.testing.assert_close(loose.kept_windows("post_train"), any_frame)
    strict = EgoMotionTask(dataclasses.replace(task.cfg, floor_contact_m=0.1, floor_frame_fraction=1.0),
                           body=task.body)
    expected = torch.nonzero((lowest <= 0.1).all(dim=1)).flatten()
    torch.testing.assert_close(strict.kept_windows("post_train"), expected)
    assert set(expected.tolist()) <= set(any_frame.tolist())
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="floor-frame-fraction"):
            dataclasses.replace(task.cfg, floor_frame_fraction=bad)


def test_perturbing_the_raw_condition_moves_the_head_translation_only(task, batch):
    """MotionGRPO section 8: the head position is perturbed, its orientation kept."""
    from diffgrpo.perturb import get_perturber

    T = batch["T_world_cpf"]
    raw = get_perturber("perlin", scale=0.05)(task.raw_condition(batch), torch.Generator().manual_seed(1))
    out = task.with_raw_condition(batch, raw)["T_world_cpf"]
    assert torch.equal(out[..., :3, :3], T[..., :3, :3]) and torch.equal(out[..., 3, :], T[..., 3, :])
    delta = out[..., :3, 3] - T[..., :3, 3]
    assert 0 < delta.abs().max() <= 0.05 * 2  # |pnoise1| stays within about [-1, 1]
