"""Sampling: a pure denoising loop, the latent and legacy samplers built on it, condition input, grids."""
