"""The shapes task: a flow-matching UNet draws a disc at a requested centre and radius.

Importing the package registers its rewards (``shapes_iou``, ``shapes_disc``) in
``diffgrpo.rewards``. See ``docs/task_shapes.md``.
"""

from tasks.shapes import rewards as rewards  # noqa: F401  (registers the rewards)
from tasks.shapes.model import ShapesModelConfig, build_model, load_prior, save_prior
from tasks.shapes.task import ShapesTask, ShapesTaskConfig, sample_images

__all__ = [
    "ShapesModelConfig",
    "ShapesTask",
    "ShapesTaskConfig",
    "build_model",
    "load_prior",
    "sample_images",
    "save_prior",
]
