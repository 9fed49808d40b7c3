"""`ldmflow legacy-ddpm`: the original unconditional UNet2DModel in pixel space, saved as a DDPMPipeline."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from diffusers import DDPMPipeline
from PIL import Image

from ldmflow.data.dataset import image_dataset
from ldmflow.data.manifest import Manifest
from ldmflow.models.architectures import build_pixel_unet
from ldmflow.models.attention import enable_memory_efficient_attention
from ldmflow.models.kinds import LEGACY_DDPM
from ldmflow.sampling.grids import image_grid, to_pil
from ldmflow.sampling.legacy import LegacySampler
from ldmflow.files import publish_files, temporary_folder
from ldmflow.settings import LegacyDdpmSettings
from ldmflow.training.ddpm_task import DdpmTask

logger = logging.getLogger(__name__)


class LegacyDdpmTask(DdpmTask):
    """Pixel-space DDPM on the manifest's images."""

    name = LEGACY_DDPM.name

    def __init__(self, settings: LegacyDdpmSettings, manifest: Manifest, val_manifest: Manifest | None = None):
        super().__init__(settings, val_manifest)
        self.manifest = manifest

    def setup(self, accelerator: Accelerator):
        s = self.settings
        unet = build_pixel_unet(s.block_out_channels, s.layers_per_block, s.resolution, s.attention_head_dim)
        enable_memory_efficient_attention(unet, s.enable_xformers_memory_efficient_attention)
        return unet, image_dataset(self.manifest, s, training=True)

    def clean_sample(self, batch: dict):
        return batch["pixel_values"]  # (B, 3, H, W) in [-1, 1]

    def validation_sample(self, batch: dict):
        return batch["pixel_values"]

    def denoiser(self, model, batch: dict, drop_conditions: bool = True):
        return lambda noisy, timesteps: model(noisy, timesteps).sample

    def _preview(self, unet, step: int) -> Image.Image:
        sampler = LegacySampler(unet, self.noise_scheduler.config)
        images = sampler.generate(num_images=self.settings.num_preview_images,
                                  num_inference_steps=self.settings.preview_inference_steps, scheduler="ddim")
        return image_grid(to_pil(images))

    def save(self, accelerator: Accelerator, model, target_dir: Path) -> dict[str, float]:
        if accelerator.is_main_process:
            unet = accelerator.unwrap_model(model)
            with self.ema_weights(unet):
                temporary = temporary_folder(target_dir, "pipeline")
                DDPMPipeline(unet=unet, scheduler=self.noise_scheduler).save_pretrained(temporary)
            publish_files(temporary, target_dir)
            logger.info("Saved the DDPMPipeline to %s.", target_dir)
        return {}
