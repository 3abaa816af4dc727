"""Rewards stage: what GRPO post-training optimises. ``registered`` registers the ``ego_*`` and
``physics_*`` rewards (import it to register them), ``perceptual`` trains and scores the learned
perceptual model behind ``ego_perceptual`` (its network: ``perceptual_model``), ``perceptual_data`` builds
its positives, negatives and warm-up, and ``perceptual_update`` is its step after each policy update.
The physics measures the ``physics_*`` rewards call live in ``tasks.ego_motion.physics``."""
