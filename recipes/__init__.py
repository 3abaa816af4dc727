"""The recipes: runnable scripts (``accelerate launch recipes/<name>.py``), one job each.

A recipe imports the library (``diffgrpo``, ``tasks``), never another recipe; what several recipes
share lives in the library (e.g. ``tasks/ego_motion/grpo.py``, the main job). From the repository
root a recipe is also importable as ``recipes.<name>``, which is how its tests run it.
"""
