"""Model stage: the conditioned diffusion prior. ``condition`` encodes the head trajectory, ``motion`` packs
the generated per-frame motion vector and its loss weights, ``network`` is the EgoAllo-style denoiser,
``egoallo_checkpoint`` loads EgoAllo's released prior, and ``prior`` holds the training loss, the noise
schedule and a quick held-out check."""
