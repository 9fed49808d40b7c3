"""One accelerate training loop (loop.py, after prepare.py) and the model-specific tasks it drives (vae, latent and
legacy DDPM, probe)."""
