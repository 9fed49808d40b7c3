"""Sampling: a pure denoising loop, the latent and pixel samplers built on it, condition input, grids."""
