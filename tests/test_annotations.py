"""The jaxtyping shape/dtype annotations on diffgrpo/ and tasks/ are checked while the suite runs.

Why: an annotation such as Float[Tensor, "B T 22 3"] documents a contract; unchecked, it drifts
from the code without anyone noticing. pyproject's pytest addopts pass
--jaxtyping-packages=diffgrpo,tasks,beartype.beartype, so jaxtyping's pytest plugin installs its
import hook before any conftest or test module imports the packages, and every function of both
packages checks its arguments and return value with beartype. These tests fail if that setup
is lost (option dropped, plugin disabled, or a package imported before the hook).
"""

from __future__ import annotations

import sys

import pytest
import torch
from jaxtyping import TypeCheckError

from diffgrpo.advantages import group_diversity
from tasks.ego_motion.evaluation.metrics import mpjpe


def test_pytest_config_enables_the_hook_for_both_packages(pytestconfig: pytest.Config) -> None:
    value = pytestconfig.getoption("jaxtyping_packages")
    assert value is not None, "pyproject's addopts lost --jaxtyping-packages"
    *packages, checker = [p.strip() for p in value.split(",")]
    assert {"diffgrpo", "tasks"} <= set(packages)
    assert checker == "beartype.beartype"
    assert pytestconfig.pluginmanager.has_plugin("jaxtyping"), "jaxtyping's pytest plugin is not loaded"
    hooks = [f for f in sys.meta_path if type(f).__name__ == "_JaxtypingFinder"]
    assert hooks, "jaxtyping's import hook is not installed"
    assert all(
        hooks[0].should_instrument(name) for name in ("diffgrpo.advantages", "tasks.ego_motion.evaluation.metrics")
    )


@pytest.mark.parametrize(
    "module_name",
    ["diffgrpo.advantages", "diffgrpo.sde", "tasks.ego_motion.evaluation.metrics", "tasks.shapes.model"],
)
def test_modules_were_loaded_through_the_hook(module_name: str) -> None:
    __import__(module_name)
    loader = sys.modules[module_name].__spec__.loader
    assert type(loader).__name__ == "_JaxtypingLoader", f"{module_name} was imported before the hook"


def test_wrong_shape_raises_in_diffgrpo() -> None:
    samples = torch.randn(4, 3)
    group_diversity(samples, torch.tensor([0, 0, 1, 1]))  # right shapes: no error
    with pytest.raises(TypeCheckError):
        group_diversity(samples, torch.tensor([0, 0, 1]))  # group_ids is " N" with N = 4


def test_wrong_dtype_raises_in_diffgrpo() -> None:
    with pytest.raises(TypeCheckError):
        group_diversity(torch.randn(4, 3), torch.tensor([0.0, 0.0, 1.0, 1.0]))  # Int expected


def test_wrong_shape_raises_in_tasks() -> None:
    joints = torch.zeros(2, 5, 22, 3)
    assert mpjpe(joints, joints).shape == (2,)
    with pytest.raises(TypeCheckError):
        mpjpe(torch.zeros(2, 5, 21, 3), torch.zeros(2, 5, 21, 3))  # 22 joints required
    with pytest.raises(TypeCheckError):
        mpjpe(joints, torch.zeros(2, 6, 22, 3))  # T must agree between the arguments
