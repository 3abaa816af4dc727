"""The tutorial's code runs as written (the docs must not rot)."""

import re
from pathlib import Path

import torch

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
