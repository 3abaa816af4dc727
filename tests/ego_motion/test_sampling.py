"""Sampling through the core rollout, window stitching, held-out evaluation and the eval recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import recipes.eval_ego_motion as eval_ego_motion_recipe
from diffgrpo.evaluate import evaluate
from diffgrpo.rng import make_generator
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.data.splits import BUNDLED_CMU_DIR
from tasks.ego_motion.model.network import DenoiserConfig, MotionDenoiser, save_denoiser
from tasks.ego_motion.sampling.sampler import (
    StitchConfig,
    evaluate_windows,
    load_clip,
    refine_decoded,
    sample_clip,
    sample_motion,
    sample_sequence,
    stitch,
    unstitch,
    window_layout,
)
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import METRIC_UNITS, EgoMotionTask, EgoMotionTaskConfig

T = 64
REPO = Path(__file__).resolve().parents[2]
SHORT_TEST_CLIP = BUNDLED_CMU_DIR / "002_02.npz"  # 74 frames at 30 fps: 73 motion frames, two 64-frame windows


def tiny_config() -> DenoiserConfig:
    return DenoiserConfig(width=16, ff_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                          timestep_features=8)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache_dir) -> EgoMotionTask:
    return EgoMotionTask(EgoMotionTaskConfig(window_frames=T, cache_dir=cache_dir), body=load_body_model())


@pytest.fixture(scope="module")
def model() -> MotionDenoiser:
    torch.manual_seed(0)
    return MotionDenoiser(tiny_config()).eval()


@pytest.fixture(scope="module")
def batch(task):
    return task.load_examples("test", torch.tensor([0, 1]))


def test_sampling_is_deterministic_given_a_seed(task, model, batch):
    a = sample_motion(task, model, batch, generator=make_generator(7, "sample"))
    b = sample_motion(task, model, batch, generator=make_generator(7, "sample"))
    c = sample_motion(task, model, batch, generator=make_generator(8, "sample"))
    assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.samples, c.samples)
    assert a.samples.shape == (2, T, 226) and a.x0_preds.shape == (2, 30, T, 226)
    assert a.is_stochastic.tolist() == [True] * 29 + [False]  # EgoAllo's last step is deterministic
    assert torch.equal(a.samples, a.x0_preds[:, -1])  # ... and lands on the last x0 prediction


@pytest.mark.parametrize("num_frames", [T, 40])
def test_stitched_sampler_equals_single_window_when_the_sequence_fits(task, model, batch, num_frames):
    short = {**batch, "T_world_cpf": batch["T_world_cpf"][:, : num_frames + 1]}
    single = sample_motion(task, model, short, generator=make_generator(3, "s"))
    stitched = sample_sequence(task, model, short["T_world_cpf"], generator=make_generator(3, "s"))
    assert stitched.layout.starts == (0,)
    assert torch.equal(stitched.x0, single.samples)
    assert torch.equal(stitched.decoded["joints_world"],
                       task.decode_x0(single.samples, short)["joints_world"])


@pytest.mark.parametrize("use_ramp_down", [False, True])
@pytest.mark.parametrize(("num_frames", "window", "overlap"),
                         [(73, 64, 16), (200, 64, 16), (256, 128, 32), (300, 128, 32), (130, 64, 0), (64, 64, 16)])
def test_stitch_weights_sum_to_one_and_ramp_up(num_frames, window, overlap, use_ramp_down):
    layout = window_layout(num_frames, StitchConfig(window, overlap, use_ramp_down=use_ramp_down))
    starts, w = layout.starts, layout.window_frames
    assert starts[0] == 0 and starts[-1] + w == num_frames
    total = torch.zeros(num_frames, dtype=torch.float64)
    for k, s in enumerate(starts):
        total[s : s + w] += layout.weights[k]
    assert torch.allclose(total, torch.ones(num_frames, dtype=torch.float64), atol=1e-12)
    assert (layout.weights > 0).all()
    # the first window has full weight until the second one starts
    second = starts[1] if len(starts) > 1 else w
    assert torch.equal(layout.weights[0, :second], torch.ones(second, dtype=torch.float64))
    # a later window's weight grows linearly over its first `overlap` frames
    if len(starts) > 2 and overlap > 1:
        ramp = layout.weights[1, :overlap]
        assert (ramp.diff() > 0).all()
        if use_ramp_down:  # a regular overlap is an exact linear crossfade
            expected = torch.arange(1, overlap + 1, dtype=torch.float64) / (overlap + 1)
            assert torch.allclose(ramp, expected, atol=1e-12)


def test_stitch_inverts_unstitch():
    layout = window_layout(150, StitchConfig(64, 16))
    sequence = torch.randn(2, 150, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    windows = unstitch(sequence, layout)
    assert windows.shape == (2, len(layout.starts), 64, 5)
    assert torch.allclose(stitch(windows, layout), sequence, atol=1e-12)


def test_stitched_two_window_clip_has_the_clip_length_and_agrees_on_the_overlap(task, model):
    batch, sample = sample_clip(task, model, SHORT_TEST_CLIP, generator=make_generator(0, "clip"),
                                stitch_cfg=StitchConfig(T, 16))
    num_frames = batch["T_world_cpf"].shape[1] - 1
    assert num_frames == 73 and sample.layout.starts == (0, 9)
    assert sample.x0.shape == (1, num_frames, 226)
    joints = sample.decoded["joints_world"]
    assert joints.shape == (1, num_frames, 22, 3) and torch.isfinite(joints).all()
    windows = sample.trajectory.samples  # (2, 64, 226): per-step averaging makes them agree where they overlap
    assert torch.allclose(windows[0, 9:], windows[1, : T - 9], atol=1e-5)
    values = task.evaluate(sample.decoded, batch)
    assert all(torch.isfinite(v).all() and v.shape == (1,) for v in values.values())
    again = sample_clip(task, model, SHORT_TEST_CLIP, generator=make_generator(0, "clip"),
                        stitch_cfg=StitchConfig(T, 16))[1]
    assert torch.equal(again.x0, sample.x0)


def test_evaluate_windows_matches_the_core_evaluation_and_tto_refines_the_same_samples(task, model):
    ours = evaluate_windows(task, model, "test", seed=5, use_tto=True, tto_cfg=TTOConfig(num_iterations=5),
                            batch_size=2, max_windows=3, keep_joints=True, progress=False)
    core = evaluate(task, model, task.sampling_chain(), split="test", seed=5,
                    batch_size=2, max_examples=3, progress=False)
    assert set(ours.metrics) == {"base", "tto"}
    for name in METRIC_UNITS:
        assert torch.equal(ours.metrics["base"][name], core[name]), name
        assert torch.isfinite(ours.metrics["tto"][name]).all() and ours.metrics["tto"][name].shape == (3,)
    # TTO keeps the root on the head and smooths the (random) sample
    assert torch.allclose(ours.metrics["tto"]["head_position_error_mm"], ours.metrics["base"]["head_position_error_mm"],
                          atol=0.01)
    assert ours.metrics["tto"]["jitter_m_per_s3"].mean() < ours.metrics["base"]["jitter_m_per_s3"].mean()
    assert ours.joints_world["base"].shape == (3, T, 22, 3)


def test_refine_decoded_takes_the_window_head_or_the_frame_aligned_one(task, model):
    """The physics evaluator refines decoded rows on ``decoded["T_world_cpf"]`` (T poses, aligned with the frames):
    the same body as on the window's T+1 poses, and on the head (not one frame off)."""
    batch = task.load_examples("test", torch.arange(2))
    trajectory = sample_motion(task, model, batch, generator=make_generator(3, "refine"))
    decoded = task.decode(trajectory.samples, batch)
    cfg = TTOConfig(num_iterations=3)
    window = refine_decoded(task, decoded, batch["T_world_cpf"], cfg)
    aligned = refine_decoded(task, decoded, decoded["T_world_cpf"], cfg)
    for key in ("T_world_root", "joints_world", "body_rotmats"):
        torch.testing.assert_close(aligned[key], window[key])
    head = task.evaluate(aligned, batch)["head_position_error_mm"]
    assert head.max() < 0.01, head  # still worn under the headset, frame by frame
    with pytest.raises(ValueError, match="poses for"):
        refine_decoded(task, decoded, batch["T_world_cpf"][:, 2:], cfg)
    broken = {**decoded, "contacts": decoded["contacts"].clone()}
    broken["contacts"][1, 5, 0] = float("nan")  # row 1 cannot be refined; row 0 alone is
    partly = refine_decoded(task, broken, batch["T_world_cpf"], cfg)
    alone = refine_decoded(task, {k: v[:1] for k, v in decoded.items()}, batch["T_world_cpf"][:1], cfg)
    torch.testing.assert_close(partly["joints_world"][:1], alone["joints_world"])
    torch.testing.assert_close(partly["joints_world"][1], decoded["joints_world"][1])  # returned as it is


def test_evaluate_windows_adds_ground_truth_free_measures_of_every_variant(task, model):
    """extra_metrics sees each variant's decoded bodies: here the mean pelvis height, checked against the joints."""
    def pelvis_height(decoded):
        return {"pelvis_height_m": decoded["T_world_root"][:, :, 2, 3].mean(dim=1)}

    ours = evaluate_windows(task, model, "test", seed=5, use_tto=True, tto_cfg=TTOConfig(num_iterations=2),
                            batch_size=2, max_windows=3, keep_joints=True, progress=False,
                            extra_metrics=pelvis_height)
    for variant in ("base", "tto"):
        expected = ours.joints_world[variant][:, :, 0, 2].mean(dim=1)
        torch.testing.assert_close(ours.metrics[variant]["pelvis_height_m"], expected)
        assert set(METRIC_UNITS) < set(ours.metrics[variant])


def test_eval_recipe_runs_end_to_end_on_a_tiny_model(tmp_path, cache_dir, model):
    recipe = eval_ego_motion_recipe
    checkpoint = tmp_path / "tiny.safetensors"
    save_denoiser(checkpoint, model)
    cfg = recipe.Config(checkpoint=checkpoint, output_dir=tmp_path / "eval", seeds=(0, 1), max_windows=2,
                        batch_size=2, tto=TTOConfig(num_iterations=3), gif_frame_step=32,
                        task=EgoMotionTaskConfig(window_frames=T, cache_dir=cache_dir))
    results = recipe.run_eval(cfg)
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert written["num_windows"] == results["num_windows"] == 2
    for variant in ("base", "tto"):
        assert set(written["metrics"][variant]) == set(METRIC_UNITS)
        for name, summary in written["metrics"][variant].items():
            assert math.isfinite(summary["mean"]) and len(summary["per_seed"]) == 2, (variant, name)
    assert set(written["metrics"]["ground_truth"]) == {"jitter_m_per_s3", "ground_penetration_m", "foot_skating_m"}
    for title in recipe.COLUMN_TITLES.values():
        assert title in markdown
    assert "| prior + TTO |" in markdown and "motions/s" in markdown
    assert written["throughput"]["motions_per_s"] > 0
    for label in ("best", "worst"):
        assert (tmp_path / "eval" / f"{label}_window.png").stat().st_size > 0
        assert (tmp_path / "eval" / f"{label}_window.gif").stat().st_size > 0
    assert written["pictures"]["best"]["mpjpe_mm"] <= written["pictures"]["worst"]["mpjpe_mm"]
    # The table of several splits reads the base rows back (here the same file twice).
    table = recipe.splits_table([tmp_path / "eval" / "results.json"] * 2).splitlines()
    mpjpe = written["metrics"]["base"]["mpjpe_mm"]["mean"]
    assert len(table) == 4 and table[2].startswith("| test | 2 | ") and f"{mpjpe:.1f}" in table[2]


def test_clip_batch_is_aligned_like_the_windows_cut_from_the_same_clip(task):
    clip = load_clip(task, SHORT_TEST_CLIP)
    windows = task.windows("test")
    index = windows.sequence_names(range(len(windows))).index(SHORT_TEST_CLIP.stem)
    window = task.load_examples("test", torch.tensor([index]))
    s = int(window["start_frame"][0])
    assert torch.allclose(window["T_world_cpf"][0], clip["T_world_cpf"][0, s : s + T + 1], atol=1e-6)
    for key in ("joints_world", "body_rotmats", "T_world_root", "contacts"):  # targets start one frame later
        assert torch.allclose(window[key][0], clip[key][0, s : s + T], atol=1e-6), key
