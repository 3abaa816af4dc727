"""Rewards stage: what GRPO post-training optimises. ``registered`` registers the ``ego_*`` and
``physics_*`` rewards (import it to register them), ``perceptual`` is the learned perceptual (visual)
critic behind ``ego_perceptual``, and ``perceptual_data`` builds that critic's positives, negatives and warm-up.
The physics measures the ``physics_*`` rewards call live in ``tasks.ego_motion.physics``."""
