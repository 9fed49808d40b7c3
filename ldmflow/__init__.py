"""ldmflow: train a VAE and a conditioned latent DDPM from an image manifest, tracked in MLflow."""

__version__ = "0.1.0"
