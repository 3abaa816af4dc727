"""Text-to-image task: diffusers pipelines as a diffgrpo task, and DDPO's image rewards.

Importing the package registers the image rewards (``jpeg_compressibility``,
``jpeg_incompressibility``) in ``diffgrpo.rewards``. See ``docs/text_to_image.md``.
"""

from tasks.text_to_image import rewards as rewards  # noqa: F401  (registers the rewards)
from tasks.text_to_image.task import (
    TextToImageTask,
    TextToImageTaskConfig,
    pipeline_family,
    save_lora_weights,
)
from tasks.text_to_image.tiny import tiny_pipeline

__all__ = ["TextToImageTask", "TextToImageTaskConfig", "pipeline_family", "save_lora_weights", "tiny_pipeline"]
