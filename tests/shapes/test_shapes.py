"""Tests of the shapes task: data, rendering, rewards, protocol, sampling and a tiny pretraining run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tasks.shapes.pretrain as shapes_pretrain
from diffgrpo.chain import SamplingChain
from diffgrpo.config import SamplerConfig
from diffgrpo.rewards import get_reward
from diffgrpo.task import Task, repeat_batch
from tasks.shapes.model import ShapesModelConfig, build_model, load_prior
from tasks.shapes.rewards import (
    centroid_error_px,
    image_to_mask,
    mask_area_px2,
    mask_centroid_px,
    relative_area_error,
    soft_iou,
)
from tasks.shapes.task import (
    ShapesTask,
    ShapesTaskConfig,
    condition_maps,
    disc_area_px2,
    render_disc_mask,
    sample_images,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ShapesModelConfig(block_out_channels=(8, 16), norm_num_groups=4, use_mid_block=False)


# -- data ----------------------------------------------------------------------------------------
def test_examples_are_deterministic_from_seed_and_splits_differ():
    indices = torch.arange(16)
    a = ShapesTask().load_examples("train", indices)
    b = ShapesTask().load_examples("train", indices)
    for key in a:
        assert torch.equal(a[key], b[key])
    test = ShapesTask().load_examples("test", indices)
    assert not torch.allclose(a["cond_px"], test["cond_px"])
    reseeded = ShapesTask(ShapesTaskConfig(train_seed=7)).load_examples("train", indices)
    assert not torch.allclose(a["cond_px"], reseeded["cond_px"])
    task = ShapesTask()
    assert task.num_examples("train") == 4096 and task.num_examples("test") == 256


def test_conditions_lie_inside_the_image_and_in_the_radius_range():
    task = ShapesTask()
    cond = task.load_examples("train", torch.arange(task.num_examples("train")))["cond_px"][:, 0]
    cx, cy, r = cond.unbind(-1)
    assert cond.shape == (4096, 3)
    assert bool((r >= 2.0).all() and (r < 5.0).all())
    for c in (cx, cy):
        assert bool((c - r - 0.5 >= 0).all() and (c + r + 0.5 <= 16).all())


def test_rendered_target_has_requested_area_and_centroid():
    task = ShapesTask()
    batch = task.load_examples("test", torch.arange(256))
    cond = batch["cond_px"][:, 0]
    mask = image_to_mask(batch["target"])
    assert batch["target"].shape == (256, 1, 16, 16)
    assert float(batch["target"].min()) == -1.0 and float(batch["target"].max()) == 1.0
    relative = (mask_area_px2(mask) / disc_area_px2(cond[:, 2]) - 1).abs()
    assert float(relative.max()) < 0.05 and float(relative.mean()) < 0.015
    assert float((mask_centroid_px(mask) - cond[:, :2]).norm(dim=-1).max()) < 0.05


def test_render_hand_case_pixel_convention():
    # Centre on the centre of pixel (row 3, column 5), radius 0.5: that pixel is fully covered,
    # its 4-neighbours (distance 1) get coverage 0, so the mask is a single pixel.
    mask = render_disc_mask(torch.tensor([[5.5, 3.5, 0.5]]), 16)[0]
    assert float(mask[3, 5]) == 1.0 and float(mask.sum()) == 1.0


def test_condition_maps_are_zero_offset_at_the_centre_pixel():
    maps = condition_maps(torch.tensor([[5.5, 3.5, 4.0]]), 16)  # (1, 3, 16, 16)
    assert maps.shape == (1, 3, 16, 16)
    assert float(maps[0, 0, 3, 5]) == 0.0 and float(maps[0, 1, 3, 5]) == 0.0
    assert float(maps[0, 0, 3, 6]) == pytest.approx(1 / 8)  # one pixel right = 1 / (S / 2)
    assert float(maps[0, 1, 4, 5]) == pytest.approx(1 / 8)  # one pixel down
    assert torch.allclose(maps[0, 2], torch.full((16, 16), 0.5))


# -- rewards -------------------------------------------------------------------------------------
def _half_plane_masks() -> tuple[torch.Tensor, torch.Tensor]:
    left = torch.zeros(1, 16, 16)
    left[..., :8] = 1.0  # columns 0..7
    middle = torch.zeros(1, 16, 16)
    middle[..., 4:12] = 1.0  # columns 4..11: shares 4 of its 8 columns with `left`
    return left, middle


def test_soft_iou_hand_cases():
    left, middle = _half_plane_masks()
    right = torch.zeros(1, 16, 16)
    right[..., 8:] = 1.0
    assert float(soft_iou(left, left)) == 1.0
    assert float(soft_iou(left, right)) == 0.0
    assert float(soft_iou(left, middle)) == pytest.approx(4 / 12)  # |A n B| = 4 cols, |A u B| = 12 cols
    half = torch.full((1, 16, 16), 0.5)
    assert float(soft_iou(half, torch.ones(1, 16, 16))) == pytest.approx(0.5)  # sum min / sum max
    assert float(soft_iou(torch.zeros(1, 16, 16), torch.zeros(1, 16, 16))) == 0.0  # not NaN
    target = render_disc_mask(torch.tensor([[8.0, 8.0, 3.0]]), 16)
    assert float(soft_iou(target, target)) == 1.0  # exact on the anti-aliased edge too


def test_centroid_and_area_errors_hand_cases():
    left, middle = _half_plane_masks()
    # left: columns 0..7 -> x = mean(0.5..7.5) = 4; middle: x = 8; both y = 8.
    assert torch.allclose(mask_centroid_px(left), torch.tensor([[4.0, 8.0]]))
    assert float(centroid_error_px(left, middle)) == pytest.approx(4.0)
    assert float(relative_area_error(left, middle)) == 0.0
    assert float(relative_area_error(left[..., :8, :], middle[..., :8, :] * 0.5)) == pytest.approx(1.0)


def test_registered_rewards_score_perfect_and_wrong_samples():
    task = ShapesTask()
    batch = task.load_examples("test", torch.arange(4))
    perfect = task.decode(batch["target"], batch)
    empty = task.decode(-torch.ones_like(batch["target"]), batch)
    iou = get_reward("shapes_iou")
    assert torch.allclose(iou(perfect, batch), torch.ones(4))
    assert torch.allclose(iou(empty, batch), torch.zeros(4))
    parts = get_reward("shapes_disc")(perfect, batch)
    assert set(parts) == {"overlap", "position", "size"}
    for value in parts.values():
        assert value.shape == (4,)
    assert torch.allclose(parts["overlap"], torch.ones(4))
    assert torch.allclose(parts["position"], torch.zeros(4), atol=1e-4)
    assert torch.allclose(parts["size"], torch.zeros(4), atol=1e-6)
    wrong = get_reward("shapes_disc")(empty, batch)
    assert bool((wrong["position"] < -1).all() and torch.allclose(wrong["size"], -torch.ones(4)))


def test_evaluate_reports_metrics_with_units():
    task = ShapesTask()
    batch = task.load_examples("test", torch.arange(3))
    metrics = task.evaluate(task.decode(batch["target"], batch), batch)
    assert set(metrics) == {"iou", "centroid_error_px", "area_error_px2"}
    assert torch.allclose(metrics["iou"], torch.ones(3))
    assert float(metrics["centroid_error_px"].max()) < 1e-4 and float(metrics["area_error_px2"].max()) < 1e-4


# -- protocol and sampling -------------------------------------------------------------------------
def test_task_satisfies_protocol_and_perturbation_keeps_target():
    task = ShapesTask()
    assert isinstance(task, Task)
    batch = repeat_batch(task.load_examples("train", torch.arange(2)), 3)
    raw = task.raw_condition(batch)
    assert raw.shape == (6, 1, 3)
    moved = task.with_raw_condition(batch, raw + torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(moved["target"], batch["target"])
    assert not torch.equal(task.encode_condition(moved), task.encode_condition(batch))
    with pytest.raises(ValueError, match="perturbers must keep the shape"):
        task.with_raw_condition(batch, raw[:, :, :2])
    timesteps = task.sampling_timesteps()
    assert timesteps.shape == (11,) and float(timesteps[0]) == 1000.0 and float(timesteps[-1]) == 0.0
    with pytest.raises(KeyError, match="unknown split"):
        task.num_examples("val")


def test_sample_images_is_deterministic_for_eta_zero():
    torch.manual_seed(0)
    task = ShapesTask()
    model = build_model(TINY_MODEL).eval()
    batch = task.load_examples("test", torch.arange(3))
    samples = [sample_images(task, model, batch, generator=torch.Generator().manual_seed(5),
                             chain=SamplingChain.of(task, SamplerConfig(eta=0.0))) for _ in range(2)]
    assert samples[0].shape == (3, 1, 16, 16)
    assert torch.equal(samples[0], samples[1])
    noisy = sample_images(task, model, batch, generator=torch.Generator().manual_seed(5),
                          chain=SamplingChain.of(task, SamplerConfig(eta=1.0)))
    assert not torch.allclose(noisy, samples[0])


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--task.radius-range-px"):
        ShapesTaskConfig(radius_range_px=(2.0, 8.0))
    with pytest.raises(ValueError, match="--task.test-seed"):
        ShapesTaskConfig(train_seed=3, test_seed=3)
    with pytest.raises(ValueError, match="norm-num-groups"):
        ShapesModelConfig(block_out_channels=(12, 16), norm_num_groups=8)


# -- pretraining -----------------------------------------------------------------------------------
def test_tiny_pretraining_reduces_loss_and_saves_a_loadable_prior(tmp_path):
    recipe = shapes_pretrain
    cfg = recipe.Config(steps=60, batch_size=32, warmup_steps=5, log_every=10, output_dir=tmp_path / "prior",
                        use_eval=False, use_progress_bar=False, model=TINY_MODEL)
    result = recipe.pretrain(cfg)
    assert len(result.losses) == 60
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    model, task_kwargs = load_prior(result.model_dir)
    task = ShapesTask(ShapesTaskConfig(**task_kwargs))
    assert task.cfg == cfg.task
    assert (result.model_dir / "metrics.json").exists()
    assert math.isfinite(result.losses[-1])
    reference = build_model(TINY_MODEL)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
