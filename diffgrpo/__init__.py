"""diffgrpo: GRPO post-training for conditioned diffusion models on diffusers and accelerate.

One concept per module: ``sde`` (step densities), ``rollout`` (group sampling), ``advantages``,
``rewards`` (registry), ``perturb`` (condition perturbers), ``loss``, ``train_step`` and
``trainer`` (the loop), ``checkpoint``, ``task`` (the plugin protocol). See docs/concepts.md.
"""

__version__ = "0.1.0"
