"""The perceptual-negatives measurement: its correlation statistic, and a tiny run end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import recipes.critic_negatives_ego_motion as critic_negatives_ego_motion_recipe
from tests.ego_motion.tiny_prior import write_tiny_prior


def test_group_correlations_match_a_hand_computation():
    recipe = critic_negatives_ego_motion_recipe
    score = torch.tensor([0.1, 0.4, 0.2, 1.0, 1.0, 1.0])
    value = torch.tensor([1.0, 3.0, 2.0, 5.0, 6.0, 7.0])
    got = recipe.group_correlations(score, value, 3)
    first = torch.corrcoef(torch.stack([score[:3], value[:3]]).double())[0, 1]
    assert got[0].item() == pytest.approx(first.item(), abs=1e-12)
    assert torch.isnan(got[1])  # no spread in the scores: no correlation, not 0


def test_tiny_measurement_pairs_every_variant_against_the_papers(tmp_path):
    recipe = critic_negatives_ego_motion_recipe
    job = recipe.main_job
    grpo = dataclasses.replace(job.default_grpo(), conditions_per_iteration=2, group_size=3, micro_batch_size=6)
    base = job.Config(prior=write_tiny_prior(tmp_path / "prior.safetensors"), task=job.EgoMotionTaskConfig(
        window_frames=32), grpo=grpo, perceptual=dataclasses.replace(job.PerceptualConfig(), width=16, num_blocks=1,
                                                                     ff_dim=32))
    variants = ("paper (x0_last, clean head)", "x0_last + members + foreign, own head")
    cfg = recipe.Config(seeds=(0,), variants=variants, iterations=2, eval_batches=1, output=tmp_path / "m.json",
                        table_output=tmp_path / "m.md", job=base)
    out = recipe.main(cfg)
    assert set(out["variants"]) == set(variants)
    for name in variants:
        seed = out["variants"][name]["seeds"]["0"]
        assert set(seed) == {*recipe.MEASURES, "critic_seconds"}
        assert 0.0 <= seed["infonce_accuracy"]["mean"] <= 1.0
    paper = out["variants"][variants[0]]["seeds"]["0"]
    assert all(paper[k]["paired_vs_paper"]["mean"] == 0.0 for k in recipe.MEASURES)
    assert "| x0_last + members + foreign, own head |" in (tmp_path / "m.md").read_text()
    assert json.loads(cfg.output.read_text())["config"]["iterations"] == 2
    with pytest.raises(ValueError, match="other settings"):  # never merge measurements of other settings
        recipe.main(dataclasses.replace(cfg, iterations=3))
    with pytest.raises(ValueError, match="unknown or empty"):
        dataclasses.replace(cfg, variants=("all of them",))
