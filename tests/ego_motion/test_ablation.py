"""The ablation recipe's variants and its table: spread, win counts and per-seed changes by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import recipes.ablation_ego_motion as ablation_ego_motion_recipe


@pytest.fixture(scope="module")
def ablation():
    return ablation_ego_motion_recipe


def _run(ablation, base_mpjpe: float, grpo_mpjpe: float, history: dict) -> dict:
    base = {m: 1.0 for m in ablation.PAPER_METRICS} | {"mpjpe_mm": base_mpjpe}
    grpo = {m: 2.0 for m in ablation.PAPER_METRICS} | {"mpjpe_mm": grpo_mpjpe, "pa_mpjpe_mm": 0.5}
    return {"base": base, "grpo": grpo, "train_seconds": 60.0, "history": history}


def test_variants_cover_the_paper_rows_without_duplicating_the_full_model(ablation):
    cfg = ablation.Config()
    variants = ablation.variant_configs(cfg)
    lam = cfg.base.grpo.perturb.scale
    assert list(variants) == ["vanilla", "+visual", f"+Perlin (full, lambda={lam})",
                              "full with Gaussian (lambda=0.03)", "full, group-shared head (lambda=0.03)",
                              "full, nested heads (lambda=0.03)", "full, nested heads (lambda=0.1)"] + [
        f"full, lambda={x}" for x in cfg.lambdas if x != lam]
    assert variants["full, nested heads (lambda=0.1)"].grpo.perturb.sharing == "nested"
    assert variants["full, group-shared head (lambda=0.03)"].grpo.perturb.sharing == "group"
    assert variants["vanilla"].grpo.perturb.name == "none" and not variants["vanilla"].use_perceptual_reward
    assert variants["+visual"].use_perceptual_reward and variants["+visual"].grpo.perturb.name == "none"
    assert variants["full with Gaussian (lambda=0.03)"].grpo.perturb.name == "gaussian"
    assert variants["full, lambda=0.1"].grpo.perturb.scale == 0.1


def test_table_reports_mean_std_wins_and_per_seed_change(ablation):
    cfg = ablation.Config(seeds=(0, 1))
    hist_a = {"adv/zero_std_frac": [0.0, 0.5], "adv/group_std/ego_rot": [0.01, 0.03], "adv/group_std/ego_pos": [0.02]}
    hist_b = {"adv/zero_std_frac": [0.25], "adv/group_std/ego_rot": [0.04], "adv/group_std/ego_pos": [0.04]}
    runs = {"full": [{**_run(ablation, 200.0, 190.0, hist_a), "seed": 0}, {**_run(ablation, 200.0, 194.0, hist_b),
                                                                            "seed": 1}]}
    text = ablation.render(runs, cfg)
    # MPJPE mean 192, sample std of (190, 194) = 2.83; PA-MPJPE 0.5 < 1.0 is the second win of seven
    assert "| full | 192.00 ± 2.83 | 0.50 ± 0.00 |" in text
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("| full | 192")][0]] \
        .endswith("| 2/7 |")
    # per-seed change: 190/200 - 1 = -5 %, 194/200 - 1 = -3 %, mean -4 %
    assert "| full | -5.00 % | -3.00 % | -4.00 % |" in text
    # zero-std: run means 0.25 and 0.25; joint std: run a mean(0.02, 0.02) = 0.02, run b mean(0.04, 0.04) = 0.04
    assert "| full | 0.2500 ± 0.0000 | 0.0300 ± 0.0141 | - | - |" in text
    assert "python recipes/ablation_ego_motion.py --seeds 0 1" in text


def test_main_reads_finished_runs_back_and_writes_table_and_picture(ablation, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(ablation.ego, "main", lambda cfg: pytest.fail(f"reran finished run {cfg.output_dir}"))
    cfg = ablation.Config(seeds=(0, 1), variants=("vanilla", "full"), output_dir=tmp_path / "runs",
                          output=tmp_path / "results.md")
    for i, name in enumerate(ablation.variant_configs(cfg)):
        for seed in cfg.seeds:
            run = _run(ablation, 200.0, 196.0 - i - seed, {"adv/adv_std": [2.0 + seed]})
            out = ablation.run_dir(cfg, name, seed)
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({k: v for k, v in run.items() if k != "history"}))
            (out / "history.json").write_text(json.dumps(run["history"]))
    runs = ablation.main(cfg)
    assert [len(v) for v in runs.values()] == [2, 2]
    text = cfg.output.read_text()
    lam = cfg.base.grpo.perturb.scale
    assert "| vanilla | 195.50 ± 0.71 |" in text and f"| +Perlin (full, lambda={lam}) | 194.50 ± 0.71 |" in text
    assert "| vanilla | - | - | 2.5000 ± 0.7071 | - |" in text
    assert cfg.output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_report_only_aggregates_finished_runs_and_names_the_missing(ablation, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(ablation.ego, "main", lambda cfg: pytest.fail(f"started run {cfg.output_dir}"))
    cfg = ablation.Config(seeds=(0, 1), variants=("vanilla",), output_dir=tmp_path / "runs",
                          output=tmp_path / "results.md", report_only=True)
    out = ablation.run_dir(cfg, "vanilla", 1)  # seed 0 still training: no results.json
    out.mkdir(parents=True)
    run = _run(ablation, 200.0, 194.0, {})
    (out / "results.json").write_text(json.dumps({k: v for k, v in run.items() if k != "history"}))
    runs = ablation.main(cfg)
    assert [r["seed"] for r in runs["vanilla"]] == [1]
    text = cfg.output.read_text()
    assert "**Not finished yet** (these rows average the seeds that are): vanilla, seed 0." in text
    assert "| vanilla | - | -3.00 % | -3.00 % |" in text
    with pytest.raises(FileNotFoundError, match="no finished run"):
        ablation.main(dataclasses.replace(cfg, output_dir=tmp_path / "empty"))


def test_config_differences_treat_missing_entries_as_defaults_and_skip_run_paths(ablation):
    defaults = {"output_dir": "a", "threads": 1, "grpo": {"seed": 0, "perturb": {"scale": 0.03}}, "new_flag": False}
    wanted = {"output_dir": "b", "threads": 2, "grpo": {"seed": 1, "perturb": {"scale": 0.03}}, "new_flag": False}
    stored = {"output_dir": "c", "threads": 1, "grpo": {"seed": 1, "perturb": {"scale": 0.03}}}  # older: no new_flag
    assert ablation.config_differences(stored, wanted, defaults) == []
    wanted_new = {**wanted, "new_flag": True, "grpo": {"seed": 1, "perturb": {"scale": 0.1}}}
    assert ablation.config_differences(stored, wanted_new, defaults) == ["grpo.perturb.scale: 0.03 -> 0.1",
                                                                          "new_flag: False -> True"]


def test_config_differences_read_runs_stored_under_the_learned_reward_s_former_names(ablation):
    # Runs stored before the perceptual reward had one name hold use_visual_reward, omega_vis, critic_*.
    defaults = {"use_perceptual_reward": True, "perceptual_omega": 1.0, "perceptual_negatives": ["x0_last"]}
    wanted = {"use_perceptual_reward": False, "perceptual_omega": 1.0, "perceptual_negatives": ["x0_last"]}
    stored = {"use_visual_reward": False, "omega_vis": 1.0, "critic_negatives": ["x0_last"]}
    assert ablation.config_differences(stored, wanted, defaults) == []
    stored_visual = {**stored, "use_visual_reward": True}
    assert ablation.config_differences(stored_visual, wanted, defaults) == ["use_perceptual_reward: True -> False"]


def test_main_refuses_a_finished_run_made_with_another_config(ablation, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(ablation.ego, "main", lambda cfg: pytest.fail(f"started run {cfg.output_dir}"))
    cfg = ablation.Config(seeds=(0,), variants=("full",), output_dir=tmp_path / "runs", output=tmp_path / "results.md")
    (name, variant), = ablation.variant_configs(cfg).items()
    out = ablation.run_dir(cfg, name, 0)
    out.mkdir(parents=True)
    run_cfg = dataclasses.replace(variant, output_dir=out, resume=True)
    run = {k: v for k, v in _run(ablation, 200.0, 194.0, {}).items() if k != "history"}
    (out / "results.json").write_text(json.dumps({**run, "config": run_cfg.effective()}))
    assert [r["seed"] for r in ablation.main(cfg)[name]] == [0]  # the same config: read back
    lr_changed = dataclasses.replace(run_cfg, grpo=dataclasses.replace(
        run_cfg.grpo, optim=dataclasses.replace(run_cfg.grpo.optim, learning_rate=1e-4)))
    (out / "results.json").write_text(json.dumps({**run, "config": lr_changed.effective()}))
    with pytest.raises(ValueError, match=r"another config \(grpo.optim.learning_rate: 0.0001 -> 2e-05\)"):
        ablation.main(cfg)


def test_variants_at_a_lambda_and_a_command_that_reproduces_the_base(ablation):
    base = ablation.Config().base
    odd_base = dataclasses.replace(base, grpo=dataclasses.replace(
        base.grpo, perturb=dataclasses.replace(base.grpo.perturb, scale=0.2, frequency=0.05)))
    cfg = ablation.Config(variants=("vanilla", "nested@0.1", "group", "nested", "gaussian@0.03"), base=odd_base)
    variants = ablation.variant_configs(cfg)
    assert list(variants) == ["vanilla", "full with Gaussian (lambda=0.03)", "full, group-shared head (lambda=0.2)",
                              "full, nested heads (lambda=0.1)", "full, nested heads (lambda=0.2)"]
    assert [v.grpo.perturb.scale for v in variants.values()] == [0.0, 0.03, 0.2, 0.1, 0.2]
    assert variants["vanilla"].grpo.perturb.sharing == "member"
    nested = variants["full, nested heads (lambda=0.1)"].grpo.perturb
    assert (nested.sharing, nested.heads_per_group, nested.frequency) == ("nested", 2, 0.05)
    assert ablation.base_flags(cfg) == " --base.grpo.perturb.scale 0.2 --base.grpo.perturb.frequency 0.05"
    assert ablation.base_flags(ablation.Config()) == ""
    text = ablation.preamble({}, cfg)
    assert "--variants vanilla nested@0.1 group nested gaussian@0.03 --base.grpo.perturb.scale 0.2" in text


@pytest.mark.parametrize(("entry", "message"), [("nestd", "unknown variant"), ("sweep@0.1", "only gaussian"),
                                                ("nested@big", "not a number"), ("nested@-0.1", "positive"),
                                                ("group@nan", "positive")])
def test_bad_variant_is_refused_when_the_config_is_made(ablation, entry, message):
    with pytest.raises(ValueError, match=message):
        ablation.Config(variants=("vanilla", entry))


def test_base_flags_parse_back_with_tyro_to_the_same_base(ablation):
    import shlex

    import tyro

    base = ablation.Config().base
    odd_base = dataclasses.replace(
        base, use_tto=False, rollout_sampling_steps=None, sde_window=(0, 3),
        task=dataclasses.replace(base.task, include_hands=True, data_root=Path("/tmp/my data")),
        grpo=dataclasses.replace(base.grpo, rewards=("ego_rot", "ego_pos")))
    cfg = ablation.Config(variants=("vanilla",), base=odd_base, supervised_steps=7)
    flags = ablation.base_flags(cfg)
    assert " --base.no-use-tto" in flags and " --base.task.include-hands" in flags and "'/tmp/my data'" in flags
    parsed = tyro.cli(ablation.Config, args=["--variants", "vanilla", *shlex.split(flags)])
    assert parsed.base == cfg.base and parsed.supervised_steps == 7


def test_paths_inside_the_repository_compare_equal_however_they_are_written(ablation):
    prior = "tasks/ego_motion/assets/demo_prior.safetensors"
    absolute = str(ablation.REPO_ROOT / prior)
    elsewhere = "/some/other/checkout/" + prior  # a run made in another clone
    assert ablation.config_differences({"prior": absolute}, {"prior": prior}, {}) == []
    assert ablation.config_differences({"prior": elsewhere}, {"prior": absolute}, {}) == []
    assert ablation.config_differences({"prior": absolute}, {"prior": "runs/other_prior.safetensors"}, {}) != []


def test_runs_of_one_table_must_share_the_prior_evaluation(ablation):
    same = {m: 1.0 for m in ablation.PAPER_METRICS}
    runs = {"a": [{"seed": 0, "base": same}], "b": [{"seed": 1, "base": same | {"mpjpe_mm": 1.0 + 1e-7}}]}
    ablation.check_same_prior(runs)
    runs["b"].append({"seed": 2, "base": same | {"mpjpe_mm": 1.1}})
    with pytest.raises(ValueError, match=r"prior's mpjpe_mm is 1.1 in \(b, seed 2\)"):
        ablation.check_same_prior(runs)


def test_a_supervised_run_with_other_steps_is_refused(ablation, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(ablation, "supervised_baseline", lambda *a: pytest.fail("started a supervised run"))
    cfg = ablation.Config(seeds=(0,), variants=("supervised",), output_dir=tmp_path / "runs",
                          output=tmp_path / "results.md")
    out = ablation.run_dir(cfg, "supervised", 0)
    out.mkdir(parents=True)
    pre = dataclasses.replace(ablation.supervised_config(cfg, 0, out), steps=cfg.supervised_steps + 1)
    run = {k: v for k, v in _run(ablation, 200.0, 194.0, {}).items() if k != "history"}
    stored = {"supervised": ablation._as_json(pre), "evaluation": ablation.evaluation_config(cfg.base)}
    (out / "results.json").write_text(json.dumps({**run, "config": stored}))
    with pytest.raises(ValueError, match="steps: 601 -> 600"):
        ablation.main(cfg)
    stored["supervised"]["steps"] = cfg.supervised_steps
    (out / "results.json").write_text(json.dumps({**run, "config": stored}))
    assert [r["seed"] for r in ablation.main(cfg)["supervised (continued diffusion training)"]] == [0]
