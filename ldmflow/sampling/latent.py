"""Latent sampling: noise -> UNet with classifier-free guidance -> VAE decode, from in-memory models or their
folders (`sampling/load.py` finds those in a saved model)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldmflow.data.conditions import ConditionSpec, extract_conditions
from ldmflow.errors import LdmflowError
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.progress import Progress
from ldmflow.sampling.denoise import cast_model, denoise, initial_noise, make_scheduler, model_dtype, step_generators
from ldmflow.sampling.sampler import GUIDANCE_SCALE, NUM_INFERENCE_STEPS, SCHEDULER, image_seeds, in_batches

logger = logging.getLogger(__name__)


class LatentSampler:
    """A `Sampler`: images for conditions in physical units from a latent UNet, its VAE and its noise schedule."""

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler_config: dict,
                 encoder: ConditionEncoder | None):
        self.unet, self.vae, self.scheduler_config, self.encoder = unet, vae, dict(scheduler_config), encoder

    @property
    def image_size(self) -> int:
        """The latent size times the VAE's downsampling (2 per level after the first)."""
        return int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_folders(cls, unet_dir, vae_dir, scheduler_dir, conditioning_path=None, device="cpu",
                     dtype: str = "fp32") -> "LatentSampler":
        """`dtype` is the UNet's (fp32, bf16, fp16); the VAE decodes in bf16 when asked, else fp32 (fp16 VAEs
        overflow)."""
        from diffusers import DDPMScheduler

        unet = UNet2DConditionModel.from_pretrained(unet_dir).to(device).eval()
        vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
        scheduler_config = DDPMScheduler.load_config(scheduler_dir)
        encoder = None
        if conditioning_path and Path(conditioning_path).is_file():
            encoder = ConditionEncoder.load(conditioning_path)
        sampler = cls(unet, vae, scheduler_config, encoder)
        sampler.set_dtype(dtype)
        return sampler

    def set_dtype(self, name: str) -> None:
        """Switch the UNet to fp32, bf16 or fp16 (and the VAE to bf16 or fp32) where they are."""
        dtype = model_dtype(name, self.unet.device)
        vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
        cast_model(self.unet, dtype)
        cast_model(self.vae, vae_dtype)

    @property
    def condition_spec(self) -> ConditionSpec:
        """What the UNet is conditioned on; an empty spec for an unconditional latent model."""
        return self.encoder.spec if self.encoder else ConditionSpec.parse("none")

    def check_conditions(self, conditions: list[dict]) -> torch.Tensor | None:
        """Validate requested conditions against the model's spec; (N, E) encoded, or None if unconditional."""
        spec = self.condition_spec
        if spec.is_empty:
            if any(conditions):
                raise LdmflowError(f"This model is unconditional (condition spec: none); got conditions "
                                   f"{sorted(set().union(*conditions))}.")
            return None
        encoded_rows, far = [], []
        for row, condition in enumerate(conditions):
            unknown = sorted(set(condition) - set(spec.names))
            if unknown:
                raise LdmflowError(f"Condition(s) {unknown} are not in this model's condition spec: {spec}.")
            values = extract_conditions(dict(condition), spec, f"image {row}")
            if not values.present.all():
                missing = [n for n, ok in zip(spec.names, values.present) if not ok]
                raise LdmflowError(f"Image {row}: missing condition(s) {missing}; this model's condition spec is "
                                   f"{spec} (give every condition, or none at all for unconditional samples).")
            encoded_rows.append({name: values.values[sl] for name, sl in spec.slices().items()})
            far.append(self.encoder.far_from_training(values.values))
        if found := [(row, text) for row, text in enumerate(far) if text]:
            logger.warning("Image %d: condition %s; the model extrapolates there%s.", found[0][0], found[0][1],
                           f" (and {len(found) - 1} more requests far outside)" if len(found) > 1 else "")
        return self.encoder.encode_physical(encoded_rows, device=self.unet.device)

    @torch.no_grad()
    def generate(self, conditions: list[dict] | None = None, *, num_images: int | None = None,
                 guidance_scale: float = GUIDANCE_SCALE, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 scheduler: str = SCHEDULER, seeds: list[int] | None = None, batch_size: int | None = None,
                 dtype: str | None = None, progress: Progress | None = None) -> np.ndarray:
        """`Sampler.generate`: (N, H, W, 3) float32 images in [0, 1]; N = len(conditions), or num_images when
        unconditional. Image i depends only on seeds[i] and its conditions, whatever `batch_size`."""
        seeds = image_seeds(conditions, num_images, seeds)
        if dtype is not None:
            self.set_dtype(dtype)
        condition = self.check_conditions(conditions) if conditions else None
        null = None
        if self.encoder and not self.condition_spec.is_empty:
            null = self.encoder.null(len(seeds), device=self.unet.device)
            condition = null if condition is None else condition
        return in_batches(len(seeds), batch_size, progress, lambda rows: self._generate(
            seeds[rows.start:rows.stop], None if condition is None else condition[rows.start:rows.stop],
            None if null is None else null[rows.start:rows.stop], guidance_scale, num_inference_steps, scheduler))

    def _generate(self, seeds, condition, null, guidance_scale, num_inference_steps, scheduler) -> np.ndarray:
        size, dtype = self.unet.config.sample_size, self.unet.dtype
        noise = initial_noise((self.unet.config.in_channels, size, size), seeds, self.unet.device)
        schedule = make_scheduler(scheduler, {**self.scheduler_config, "clip_sample": False})  # latents are unbounded

        def model(sample, timestep, class_labels):
            labels = None if class_labels is None else class_labels.to(dtype)
            return self.unet(sample.to(dtype), timestep, encoder_hidden_states=None, class_labels=labels).sample.float()

        latents = denoise(model, schedule, noise, num_inference_steps, condition, null, guidance_scale,
                          generator=step_generators(seeds))
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        images = self.vae.decode(latents).sample  # (N, 3, H, W) in ~[-1, 1]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images.permute(0, 2, 3, 1).cpu().numpy()
