"""diffgrpo: GRPO post-training for conditioned diffusion models on diffusers and accelerate.

One concept per module: ``sde`` (step densities), ``chain`` (the sampling chain as one value),
``rollout`` (group sampling), ``rng`` (seeded, named generators), ``advantages``, ``rewards`` and
``perturb`` (on the one ``registry`` helper), ``loss``, ``train_step`` and ``trainer`` (the loop:
Algorithm 1), ``checkpoint``, ``task`` (the plugin protocol). See docs/concepts.md and
docs/architecture.md.
"""

__version__ = "0.1.0"
