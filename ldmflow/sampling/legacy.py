"""Sampling from a legacy (pixel-space) DDPM output folder (a DDPMPipeline folder)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ldmflow.sampling.denoise import denoise, initial_noise, make_scheduler, step_generators


class LegacySampler:
    """Unconditional images from a UNet2DModel and its training noise schedule."""

    def __init__(self, unet: UNet2DModel, scheduler_config: dict):
        self.unet, self.scheduler_config = unet, dict(scheduler_config)

    @classmethod
    def from_folder(cls, folder, device="cpu") -> "LegacySampler":
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).eval()
        return cls(unet, DDPMScheduler.load_config(folder, subfolder="scheduler"))

    @torch.no_grad()
    def generate(self, num_images: int = 1, num_inference_steps: int = 25, scheduler: str = "ddim",
                 seeds: list[int] | None = None) -> np.ndarray:
        """(N, H, W, 3) float32 images in [0, 1]."""
        seeds = list(seeds) if seeds is not None else list(range(num_images))
        size = self.unet.config.sample_size
        noise = initial_noise((self.unet.config.in_channels, size, size), seeds, self.unet.device)
        images = denoise(lambda x, t, _: self.unet(x, t).sample, make_scheduler(scheduler, self.scheduler_config),
                         noise, num_inference_steps, generator=step_generators(seeds))
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
