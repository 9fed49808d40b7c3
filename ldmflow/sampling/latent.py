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
from ldmflow.sampling.denoise import (ComposedGuidance, cast_model, denoise, initial_noise, make_scheduler, model_dtype,
                                      step_generators)
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

    def check_conditions(self, conditions: list[dict],
                         condition_guidance: dict[str, float] | None = None) -> torch.Tensor | None:
        """Validate requested conditions against the model's spec; (N, E) encoded, or None if unconditional."""
        rows = self._requested(conditions)
        self._check_guidance(condition_guidance, rows)
        return None if rows is None else self.encoder.encode_physical(rows, device=self.unet.device)

    def _requested(self, conditions: list[dict]) -> list[dict[str, np.ndarray]] | None:
        """Each row's given conditions, name -> values (None for an unconditional model); one line for a condition
        the model does not take, or one it leaves out that it was not trained to leave out."""
        spec = self.condition_spec
        if spec.is_empty:
            if any(conditions):
                raise LdmflowError(f"This model is unconditional (condition spec: none); got conditions "
                                   f"{sorted(set().union(*conditions))}.")
            return None
        rows, far = [], []
        for row, condition in enumerate(conditions):
            unknown = sorted(set(condition) - set(spec.names))
            if unknown:
                raise LdmflowError(f"Condition(s) {unknown} are not in this model's condition spec: {spec}.")
            values = extract_conditions(dict(condition), spec, f"image {row}")
            self._check_omitted(row, [name for name, ok in zip(spec.names, values.present) if not ok])
            rows.append({name: values.values[where] for (name, where), ok in zip(spec.slices().items(), values.present)
                         if ok})
            far.append(self.encoder.far_from_training(values.values, present=values.present))
        if found := [(row, text) for row, text in enumerate(far) if text]:
            logger.warning("Image %d: condition %s; the model extrapolates there%s.", found[0][0], found[0][1],
                           f" (and {len(found) - 1} more requests far outside)" if len(found) > 1 else "")
        return rows

    def _check_omitted(self, row: int, missing: list[str]) -> None:
        """A request may leave out only the conditions the model was trained to do without."""
        untrained = [name for name in missing if name not in self.encoder.omittable]
        if not untrained:
            return
        if not self.encoder.omittable:
            raise LdmflowError(f"Image {row}: missing condition(s) {missing}; this model's condition spec is "
                               f"{self.condition_spec} and it was trained without per-condition dropout (give every "
                               "condition, or none at all for unconditional samples; to ask for some only, train "
                               "with --cond_dropout_per_condition 0.1, an option of latent-ddpm).")
        raise LdmflowError(f"Image {row}: missing condition(s) {untrained}; this model was trained to do without "
                           f"{list(self.encoder.omittable)} only (to leave out {untrained} too, train with "
                           "--cond_dropout_per_condition naming them).")

    def _check_guidance(self, condition_guidance: dict[str, float] | None, rows: list[dict] | None) -> None:
        """--condition_guidance names conditions of this model, and each condition's own prediction (every other
        condition left out) is a request the model was trained for."""
        if not condition_guidance:
            return
        names = self.condition_spec.names
        if rows is None:
            raise LdmflowError("--condition_guidance weighs the conditions asked for; this request has none"
                               f"{' (the model is unconditional)' if not names else ''}.")
        unknown = sorted(set(condition_guidance) - set(names))
        if unknown:
            raise LdmflowError(f"--condition_guidance names {', '.join(unknown)}, which this model does not take "
                               f"(its conditions: {', '.join(names)}).")
        for name in names:
            others = [other for other in names if other != name and other not in self.encoder.omittable]
            if others and any(name in row for row in rows):
                raise LdmflowError(f"--condition_guidance predicts each condition alone, and this model was not "
                                   f"trained without {others} (train it with --cond_dropout_per_condition 0.1, an "
                                   "option of latent-ddpm).")

    def _composed(self, rows: list[dict], condition_guidance: dict[str, float],
                  guidance_scale: float) -> ComposedGuidance | None:
        """One part per condition some row gives: every row with only that condition (null where it lacks it),
        weighed by its --condition_guidance weight, else `guidance_scale`; None when no row gives any."""
        given = [name for name in self.condition_spec.names if any(name in row for row in rows)]
        if not given:
            return None
        parts = [self.encoder.encode_physical([{name: row[name]} if name in row else {} for row in rows],
                                              device=self.unet.device) for name in given]  # each (N, E)
        return ComposedGuidance(torch.stack(parts), tuple(float(condition_guidance.get(name, guidance_scale))
                                                          for name in given))

    @torch.no_grad()
    def generate(self, conditions: list[dict] | None = None, *, num_images: int | None = None,
                 guidance_scale: float = GUIDANCE_SCALE, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 scheduler: str = SCHEDULER, seeds: list[int] | None = None, batch_size: int | None = None,
                 dtype: str | None = None, progress: Progress | None = None,
                 condition_guidance: dict[str, float] | None = None) -> np.ndarray:
        """`Sampler.generate`: (N, H, W, 3) float32 images in [0, 1]; N = len(conditions), or num_images when
        unconditional. Image i depends only on seeds[i] and its conditions, whatever `batch_size`."""
        seeds = image_seeds(conditions, num_images, seeds)
        if dtype is not None:
            self.set_dtype(dtype)
        rows = self._requested(conditions) if conditions else None
        self._check_guidance(condition_guidance, rows)
        condition = None if rows is None else self.encoder.encode_physical(rows, device=self.unet.device)
        composed = self._composed(rows, condition_guidance, guidance_scale) if condition_guidance else None
        null = None
        if self.encoder and not self.condition_spec.is_empty:
            null = self.encoder.null(len(seeds), device=self.unet.device)
            condition = null if condition is None else condition
        return in_batches(len(seeds), batch_size, progress, lambda part: self._generate(
            seeds[part.start:part.stop], None if condition is None else condition[part.start:part.stop],
            None if null is None else null[part.start:part.stop], guidance_scale, num_inference_steps, scheduler,
            None if composed is None else composed.rows(part)))

    def _generate(self, seeds, condition, null, guidance_scale, num_inference_steps, scheduler,
                  composed: ComposedGuidance | None = None) -> np.ndarray:
        size, dtype = self.unet.config.sample_size, self.unet.dtype
        noise = initial_noise((self.unet.config.in_channels, size, size), seeds, self.unet.device)
        schedule = make_scheduler(scheduler, {**self.scheduler_config, "clip_sample": False})  # latents are unbounded

        def model(sample, timestep, class_labels):
            labels = None if class_labels is None else class_labels.to(dtype)
            return self.unet(sample.to(dtype), timestep, encoder_hidden_states=None, class_labels=labels).sample.float()

        latents = denoise(model, schedule, noise, num_inference_steps, condition, null, guidance_scale,
                          generator=step_generators(seeds), composed=composed)
        latents = (latents / self.vae.config.scaling_factor).to(self.vae.dtype)
        images = self.vae.decode(latents).sample  # (N, 3, H, W) in ~[-1, 1]
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images.permute(0, 2, 3, 1).cpu().numpy()
