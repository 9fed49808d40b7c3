"""One accelerate training loop (loop.py) and the model-specific tasks it drives (vae, latent and legacy DDPM)."""
