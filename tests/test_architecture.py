"""Imports go one way (core <- tasks <- recipes; the ego wing bottom-up), and docs/architecture.md says so."""

from __future__ import annotations

from pathlib import Path

import recipes.architecture_table as architecture
from recipes.architecture_table import ROOT, imports_of, layer_table, layering_violations


def test_the_repository_keeps_its_layering():
    assert layering_violations(ROOT) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CLEAN = {
    "diffgrpo/__init__.py": "",
    "diffgrpo/rollout.py": "import torch\n",
    "tasks/__init__.py": "",
    "tasks/shapes/__init__.py": "",
    "tasks/shapes/task.py": "from diffgrpo.rollout import rollout\n",
    "tasks/ego_motion/__init__.py": "from tasks.ego_motion.task import EgoMotionTask\n",
    "tasks/ego_motion/body/__init__.py": "",
    "tasks/ego_motion/body/geometry.py": "import math\n",
    "tasks/ego_motion/data/__init__.py": "",
    "tasks/ego_motion/data/windows.py": "from ..body.geometry import NUM_BETAS\n",
    "tasks/ego_motion/task.py": "from tasks.ego_motion.data import windows\n",
    "tasks/ego_motion/rewards/__init__.py": "",
    "tasks/ego_motion/rewards/registered.py": "def f():\n    from tasks.ego_motion.task import EgoMotionTask\n",
    "recipes/__init__.py": "",
    "recipes/job.py": "import tasks.ego_motion\nimport diffgrpo.rollout\n",
    "tests/__init__.py": "",
    "tests/test_job.py": "import recipes.job\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    assert layering_violations(_write(tmp_path, CLEAN)) == []


def test_each_wrong_import_is_caught_and_named(tmp_path):
    wrong = {
        "diffgrpo/rollout.py": "from tasks.shapes.task import X\n",  # the core imports a task
        "tasks/shapes/task.py": "import tasks.ego_motion.task\n",  # a task imports another task
        "tasks/ego_motion/body/geometry.py": "def f():\n    from ..data.windows import NUM_BETAS\n",  # body -> data
        "tasks/ego_motion/data/windows.py": "from tasks.ego_motion import task\n",  # data -> the task adapter
        "tasks/ego_motion/rewards/registered.py": "import recipes.job\n",  # a task imports a recipe
        "recipes/job.py": "import sys\nsys.path.insert(0, 'recipes')\n",
        "tests/test_job.py": "import importlib.util\nimportlib.util.spec_from_file_location('job', 'recipes/job.py')\n",
    }
    found = "\n".join(layering_violations(_write(tmp_path, {**CLEAN, **wrong})))
    assert "diffgrpo/rollout.py: the core imports tasks.shapes.task" in found
    assert "tasks/shapes/task.py: task shapes imports another task's tasks.ego_motion.task" in found
    assert "tasks/ego_motion/body/geometry.py: layer 'body' imports tasks.ego_motion.data.windows" in found
    assert "tasks/ego_motion/data/windows.py: layer 'data' imports tasks.ego_motion.task" in found
    assert "tasks/ego_motion/rewards/registered.py: a task imports the recipe recipes.job" in found
    assert "recipes/job.py: changes sys.path" in found
    assert "tests/test_job.py: loads a module from a file path" in found
    assert len(found.splitlines()) == 7


def test_imports_resolve_to_absolute_module_names(tmp_path):
    root = _write(tmp_path, CLEAN)
    assert imports_of(root / "tasks/ego_motion/data/windows.py", root) == {"tasks.ego_motion.body.geometry"}
    assert imports_of(root / "tasks/ego_motion/task.py", root) == {"tasks.ego_motion.data.windows"}  # a module


def test_the_architecture_page_holds_the_generated_table():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert architecture.with_table(page, layer_table(ROOT)) == page, (
        "docs/architecture.md is out of date: run python recipes/architecture_table.py --write")


def test_the_ego_wing_public_face_names_each_thing_from_its_home():
    import importlib

    import pytest

    import tasks.ego_motion as ego

    for name in ego.__all__:
        assert getattr(ego, name) is getattr(importlib.import_module(ego._PUBLIC[name]), name), name
    with pytest.raises(AttributeError, match="public names"):
        ego.EgoMotionTasks  # noqa: B018
