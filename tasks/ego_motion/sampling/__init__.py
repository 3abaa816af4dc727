"""Sampling stage: motions drawn from the prior. ``sampler`` samples one window, a long sequence stitched
from overlapping windows, or a held-out evaluation through ``diffgrpo.rollout.rollout`` (the policy GRPO
post-trains), and ``tto`` refines sampled motions by test-time optimisation."""
