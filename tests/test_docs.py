"""The tutorial's code runs as written (the docs must not rot)."""

import re
from pathlib import Path

import torch

import recipes.readme_results as readme_results_recipe
from diffgrpo.rewards import RewardSet, available_rewards

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_reward_tutorial_code_registers_a_working_reward():
    text = (DOCS / "tutorial_reward.md").read_text()
    block = re.search(r"```python\n(# my_rewards.py.*?)```", text, re.S).group(1)
    if "crisp_mask" not in available_rewards():
        exec(compile(block, "tutorial_reward.md", "exec"), {})
    import tasks.shapes.rewards  # noqa: F401  (registers shapes_disc)

    rewards = RewardSet.from_specs({"shapes_disc": 1.0, "crisp_mask": 0.5})
    target = -torch.ones(2, 1, 16, 16)
    target[:, :, 4:10, 4:10] = 1.0
    binary = (target[:, 0] > 0).float()
    out = rewards({"mask": torch.stack([binary[0], torch.full((16, 16), 0.5)])}, {"target": target,
                  "cond_px": torch.tensor([[[7.0, 7.0, 3.0]]]).expand(2, 1, 3)})
    assert out.components["crisp_mask"].tolist() == [1.0, 0.0]
    assert out.weights["crisp_mask"] == 0.5


def test_readme_results_table_is_the_one_generated_from_the_results_files():

    readme_results = readme_results_recipe
    readme = (DOCS.parent / "README.md").read_text()
    table = readme_results.results_table()
    assert readme_results.replace_table(readme, table) == readme, (
        "README.md's results table differs from the results files: run `python recipes/readme_results.py --write`")
    assert table.count("\n| ego-motion") == len(readme_results.EGO_METRICS)


def test_main_job_page_is_the_one_generated_from_the_results_files():
    page = readme_results_recipe.main_job_page()
    assert readme_results_recipe.MAIN_JOB_PAGE.read_text() == page, (
        "docs/results_main_job.md differs from the results files: run `python recipes/readme_results.py --write`")
    assert page.count("| MPJPE (mm) |") == 2  # the selected and the last weights


def test_replace_table_needs_both_markers_in_order():
    import pytest


    readme_results = readme_results_recipe
    text = f"intro\n{readme_results.BEGIN}\nold\n{readme_results.END}\nrest\n"
    expected = f"intro\n{readme_results.BEGIN}\nnew\n{readme_results.END}\nrest\n"
    assert readme_results.replace_table(text, "new\n") == expected
    with pytest.raises(ValueError, match="needs the lines"):
        readme_results.replace_table("no markers\n", "new\n")
