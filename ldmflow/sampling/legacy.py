"""Sampling from a legacy (pixel-space) DDPM output folder (a DDPMPipeline folder)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from ldmflow.errors import LdmflowError
from ldmflow.progress import Progress
from ldmflow.sampling.denoise import cast_model, denoise, initial_noise, make_scheduler, model_dtype, step_generators
from ldmflow.sampling.sampler import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, SCHEDULER, image_seeds, in_batches


class LegacySampler:
    """A `Sampler` of unconditional images from a UNet2DModel and its training noise schedule."""

    condition_spec = None  # it takes no conditions at all

    def __init__(self, unet: UNet2DModel, scheduler_config: dict):
        self.unet, self.scheduler_config = unet, dict(scheduler_config)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size)

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

    def check_conditions(self, conditions: list[dict], condition_guidance: dict[str, float] | None = None) -> None:
        """Blank conditions are unconditional requests; any value (or guidance per condition) is one clear error."""
        if condition_guidance:
            raise LdmflowError("This model is unconditional (a legacy pixel DDPM): --condition_guidance does not "
                               "apply.")
        if any(conditions):
            raise LdmflowError(f"This model is unconditional (a legacy pixel DDPM); got conditions "
                               f"{sorted(set().union(*conditions))}.")

    @torch.no_grad()
    def generate(self, conditions: list[dict] | None = None, *, num_images: int | None = None,
                 guidance_scale: float = GUIDANCE_SCALE, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 scheduler: str = SCHEDULER, seeds: list[int] | None = None, batch_size: int | None = None,
                 dtype: str | None = None, progress: Progress | None = None,
                 condition_guidance: dict[str, float] | None = None) -> np.ndarray:
        """`Sampler.generate`: (N, H, W, 3) float32 images in [0, 1]; image i depends only on seeds[i], whatever
        `batch_size`. Without conditions there is nothing for `guidance_scale` to mix: it is ignored."""
        if conditions or condition_guidance:
            self.check_conditions(conditions or [], condition_guidance)
        seeds = image_seeds(conditions, num_images, seeds)
        if dtype is not None:
            self.set_dtype(dtype)
        return in_batches(len(seeds), batch_size, progress,
                          lambda rows: self._generate(seeds[rows.start:rows.stop], num_inference_steps, scheduler))

    def _generate(self, seeds: list[int], num_inference_steps: int, scheduler: str) -> np.ndarray:
        size, dtype = self.unet.config.sample_size, self.unet.dtype
        noise = initial_noise((self.unet.config.in_channels, size, size), seeds, self.unet.device)
        images = denoise(lambda x, t, _: self.unet(x.to(dtype), t).sample.float(),
                         make_scheduler(scheduler, self.scheduler_config), noise, num_inference_steps,
                         generator=step_generators(seeds))
        return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
