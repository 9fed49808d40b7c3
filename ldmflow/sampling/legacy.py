"""Sampling from a legacy (pixel-space) DDPM output folder (a DDPMPipeline folder)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ldmflow.sampling.denoise import (batches, cast_model, denoise, initial_noise, make_scheduler, model_dtype,
                                     step_generators)


class LegacySampler:
    """Unconditional images from a UNet2DModel and its training noise schedule."""

    def __init__(self, unet: UNet2DModel, scheduler_config: dict):
        self.unet, self.scheduler_config = unet, dict(scheduler_config)

    @classmethod
    def from_folder(cls, folder, device="cpu", dtype: str = "fp32") -> "LegacySampler":
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).eval()
        sampler = cls(unet, DDPMScheduler.load_config(folder, subfolder="scheduler"))
        sampler.set_dtype(dtype)
        return sampler

    def set_dtype(self, name: str) -> None:
        """Switch the UNet to fp32, bf16 or fp16 where it is."""
        dtype = model_dtype(name, self.unet.device)
        cast_model(self.unet, dtype)

    @torch.no_grad()
    def generate(self, num_images: int = 1, num_inference_steps: int = 25, scheduler: str = "ddim",
                 seeds: list[int] | None = None, batch_size: int | None = None) -> np.ndarray:
        """(N, H, W, 3) float32 images in [0, 1]; image i depends only on seeds[i], whatever `batch_size`."""
        seeds = list(seeds) if seeds is not None else list(range(num_images))
        return np.concatenate([self._generate(seeds[rows.start:rows.stop], num_inference_steps, scheduler)
                               for rows in batches(len(seeds), batch_size)])

    def _generate(self, seeds: list[int], num_inference_steps: int, scheduler: str) -> np.ndarray:
        size, dtype = self.unet.config.sample_size, self.unet.dtype
        noise = initial_noise((self.unet.config.in_channels, size, size), seeds, self.unet.device)
        images = denoise(lambda x, t, _: self.unet(x.to(dtype), t).sample.float(),
                         make_scheduler(scheduler, self.scheduler_config), noise, num_inference_steps,
                         generator=step_generators(seeds))
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
