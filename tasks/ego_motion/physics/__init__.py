"""Physics of generated motions on MuJoCo: a humanoid per body shape, inverse dynamics, simulated
tracking and kinematic plausibility (RLPF's physical feedback, arXiv 2506.12769)."""
