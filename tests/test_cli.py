"""Deprecated flag spellings keep working: rewritten to the new ones, with a warning naming both."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from diffgrpo.cli import parse, renamed_flags
from diffgrpo.config import SamplerConfig


@dataclass(frozen=True)
class _Config:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0


def test_old_sampler_flags_are_rewritten_with_a_warning(caplog):
    renamed = {"--grpo.sampler.": "--sampler."}
    with caplog.at_level(logging.WARNING, logger="diffgrpo.cli"):
        args = renamed_flags(["--grpo.sampler.eta", "0.5", "--grpo.sampler.method=ddim", "--seed", "3"], renamed)
    assert args == ["--sampler.eta", "0.5", "--sampler.method=ddim", "--seed", "3"]
    assert "--grpo.sampler.eta is deprecated; use --sampler.eta" in caplog.text
    cfg = parse(_Config, renamed=renamed, args=["--grpo.sampler.eta", "0.5", "--seed", "3"])
    assert cfg.sampler.eta == 0.5 and cfg.seed == 3
    assert parse(_Config, renamed=renamed, args=["--sampler.eta", "0.25"]).sampler.eta == 0.25


def test_errors_name_flags_as_a_nesting_recipe_spells_them():
    import pytest

    from diffgrpo.cli import flags_spelled
    from diffgrpo.config import GRPOConfig, StepSelectionConfig

    nesting = {"--grpo.": "--base.grpo.", "--task.": "--base.task."}
    with pytest.raises(ValueError, match=r"needs --base\.grpo\.steps\.window START END") as caught:
        with flags_spelled(nesting):
            GRPOConfig(rewards=("r",), steps=StepSelectionConfig(mode="window"))
    assert "--grpo.steps" not in str(caught.value).replace("--base.grpo.steps", "")
    with pytest.raises(KeyError, match="no flag here"), flags_spelled(nesting):  # nothing to respell: as raised
        raise KeyError("no flag here")
    with pytest.raises(ValueError, match=r"^--base\.grpo\.x or --base\.task\.y$"), flags_spelled(nesting):
        raise ValueError("--grpo.x or --task.y")
