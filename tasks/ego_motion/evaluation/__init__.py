"""Evaluation stage: how good a recovered motion is. ``metrics`` computes the per-sequence evaluation
metrics shared with the rewards and the result tables, and ``render`` draws ground-truth vs predicted
skeletons as a still grid (PNG) or an animation (GIF)."""
