"""`ldmflow latent-ddpm`: a conditioned UNet2DConditionModel on the scaled latents of a trained VAE."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldmflow.data.dataset import image_dataset
from ldmflow.data.latent_cache import CachedLatents
from ldmflow.data.manifest import Manifest
from ldmflow.errors import LdmflowError
from ldmflow.evaluation.adherence import adherence_metric_names, condition_errors, manifest_ranges, manifest_requests
from ldmflow.evaluation.metric_names import VALIDATION
from ldmflow.models.architectures import build_latent_unet, vae_downsample_factor
from ldmflow.models.attention import enable_memory_efficient_attention
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.models.kinds import LATENT_DDPM, UNET_FOLDER
from ldmflow.models.probe import ProbeReader
from ldmflow.models.saved_model import VaeRecord
from ldmflow.sampling.condition_input import spanning_conditions
from ldmflow.sampling.grids import condition_label, image_grid, to_pil
from ldmflow.sampling.latent import LatentSampler
from ldmflow.files import model_digest, publish_folder, temporary_folder
from ldmflow.settings import LatentDdpmSettings
from ldmflow.training.ddpm_task import DdpmTask
from ldmflow.training.latent_encoding import encode_posteriors, open_latent_cache

logger = logging.getLogger(__name__)
ADHERENCE_REQUESTS = 8


def load_vae(folder: str | Path, described_as: str) -> AutoencoderKL:
    """A frozen fp32 AutoencoderKL (any latent channels and downsampling), or a clear error."""
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except (OSError, ValueError, EnvironmentError) as error:
        raise LdmflowError(f"--vae_uri {described_as}: not a diffusers AutoencoderKL folder "
                           f"({str(error).splitlines()[0]}). Train one with `ldmflow vae`.") from None
    return vae.eval().requires_grad_(False)


def latent_size(settings: LatentDdpmSettings, vae: AutoencoderKL) -> int:
    """The latents' side at --resolution; refused unless the VAE and then every UNet level divide it."""
    factor, levels = vae_downsample_factor(vae.config), len(settings.block_out_channels) - 1
    size = settings.resolution // factor
    if settings.resolution % factor or size % 2 ** levels:
        raise LdmflowError(
            f"--resolution {settings.resolution} must be a multiple of {factor * 2 ** levels}: the VAE downsamples "
            f"x{factor} and the UNet's {len(settings.block_out_channels)} --block_out_channels x{2 ** levels} more.")
    return size


class LatentDdpmTask(DdpmTask):
    """Latent diffusion: VAE encoding (or its cache), condition encoding with dropout, UNet, previews, saving."""

    name = LATENT_DDPM.name

    def __init__(self, settings: LatentDdpmSettings, manifest: Manifest, vae_source,
                 val_manifest: Manifest | None = None, probe_dir: Path | None = None):
        super().__init__(settings, val_manifest, clip_sample=False)  # latents are not bounded to [-1, 1]
        self.probe = ProbeReader.from_folder(probe_dir) if probe_dir else None
        self.ranges = manifest_ranges(manifest) if self.probe else None  # what adherence % refer to
        self.manifest, self.vae_source = manifest, vae_source
        self.encoder = None if manifest.spec.is_empty else ConditionEncoder.for_records(
            manifest.spec, manifest.stats, manifest.records, settings.dropout_per_condition())
        self.vae = load_vae(vae_source.local_dir, settings.vae_uri)  # checked before any MLflow run opens
        self.latent_size = latent_size(settings, self.vae)

    def setup(self, accelerator: Accelerator):
        s = self.settings
        self.vae = self.vae.to(accelerator.device)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        unet = build_latent_unet(s.block_out_channels, s.layers_per_block, self.latent_size,
                                 self.vae.config.latent_channels, self.encoder.encoded_dim if self.encoder else None,
                                 s.attention_head_dim, s.time_embedding_dim)
        enable_memory_efficient_attention(unet, s.enable_xformers_memory_efficient_attention)
        dataset = self._cache_latents(accelerator) if s.cache_latents else image_dataset(self.manifest, s, training=True)
        self.preview_conditions = spanning_conditions(self.manifest, s.num_preview_images)
        return unet, dataset

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_posteriors(self.vae, pixels)

    def _cache_latents(self, accelerator: Accelerator) -> CachedLatents:
        """The on-disk cache of this VAE and data (built now if no earlier run or `cache-latents` did)."""
        cache, dataset = open_latent_cache(self.settings, self.manifest, self.vae, self.vae_source.local_dir,
                                           accelerator, self.settings.output_dir)
        self.unreadable_before_training = frozenset(dataset.index.unreadable)
        self.non_finite_before_training = frozenset(dataset.index.non_finite)
        self.latent_cache = cache
        return dataset

    def clean_sample(self, batch: dict) -> torch.Tensor:
        if "latent_parameters" in batch:
            latents = DiagonalGaussianDistribution(batch["latent_parameters"]).sample()
        else:
            latents = DiagonalGaussianDistribution(self._encode(batch["pixel_values"])).sample()
        return latents * self.scaling_factor  # (B, c, h, w), unit variance by construction of the factor

    def validation_sample(self, batch: dict) -> torch.Tensor:
        return DiagonalGaussianDistribution(self._encode(batch["pixel_values"])).mode() * self.scaling_factor

    def denoiser(self, model, batch: dict, drop_conditions: bool = True):
        labels = None
        if self.encoder is not None:
            encoded = self.encoder.encode(batch["conditions"].float(), batch["present"].float())  # (B, D + K)
            if drop_conditions:  # each condition alone (--cond_dropout_per_condition), then all (guidance)
                encoded = self.encoder.drop(self.encoder.drop_each(encoded), self.settings.cond_dropout_prob)
            labels = encoded
        return lambda noisy, timesteps: model(noisy, timesteps, encoder_hidden_states=None,
                                              class_labels=labels).sample

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """With the dataset's probe, condition adherence comes first: the default --checkpoint_metric is then
        val/condition_error_pct (what users care about), not the denoising loss."""
        losses = super().validation_metrics
        if self.probe is None or not losses:
            return losses
        return tuple(f"{VALIDATION}{name}" for name in adherence_metric_names(self.manifest.spec)) + losses

    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool, validate: bool):
        metrics, images = super().end_of_epoch(accelerator, model, step, previews, validate)
        if validate and self.probe is not None and accelerator.is_main_process:
            unet = accelerator.unwrap_model(model)
            with self.ema_weights(unet):
                metrics.update(self._adherence(unet))
        return metrics, images

    @torch.no_grad()
    def _adherence(self, unet) -> dict[str, float]:
        """A cheap condition-adherence score (main process): ADHERENCE_REQUESTS fixed val requests, sampled
        like the previews and read back by the dataset's probe, in % of the training range."""
        s = self.settings
        requests = manifest_requests(self.val_manifest, ADHERENCE_REQUESTS)
        sampler = LatentSampler(unet, self.vae, self.noise_scheduler.config, self.encoder)
        images = sampler.generate(requests.conditions, guidance_scale=s.guidance_scale,
                                  num_inference_steps=s.preview_inference_steps,
                                  seeds=list(range(len(requests.conditions))))
        errors = condition_errors(self.manifest.spec, requests.values, requests.present, self.probe.read(images),
                                  self.ranges)
        return {f"{VALIDATION}{key}": value for key, value in errors.items()}

    def _preview(self, unet, step: int) -> Image.Image:
        sampler = LatentSampler(unet, self.vae, self.noise_scheduler.config, self.encoder)
        if self.encoder is None:
            images = sampler.generate(num_images=self.settings.num_preview_images,
                                      num_inference_steps=self.settings.preview_inference_steps)
            return image_grid(to_pil(images))
        conditions = self.preview_conditions
        images = sampler.generate(conditions, guidance_scale=self.settings.guidance_scale,
                                  num_inference_steps=self.settings.preview_inference_steps)
        return image_grid(to_pil(images), labels=[condition_label(c) for c in conditions])

    def save(self, accelerator: Accelerator, model, target_dir: Path) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        output_dir = Path(target_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        unet = accelerator.unwrap_model(model)
        with self.ema_weights(unet):
            temporary = temporary_folder(output_dir, UNET_FOLDER)
            unet.save_pretrained(temporary, safe_serialization=True)
        publish_folder(temporary, output_dir / UNET_FOLDER)
        self.noise_scheduler.save_pretrained(output_dir)
        if self.encoder is not None:
            self.encoder.save(output_dir)
        self.vae_source_record().write(output_dir)
        logger.info("Saved the latent DDPM to %s.", output_dir)
        return {}

    def vae_source_record(self) -> VaeRecord:
        """vae_source.json: which VAE the latents came from, and the condition spec."""
        source = self.vae_source
        return VaeRecord(vae_path=str(Path(source.local_dir).resolve()), vae_uri=source.uri,
                         vae_model_name=source.model_name, vae_model_version=source.model_version,
                         vae_run_id=source.run_id, vae_model_id=source.model_id,
                         vae_scaling_factor=self.scaling_factor, vae_digest=model_digest(source.local_dir),
                         vae_latent_channels=self.vae.config.latent_channels,
                         vae_downsample_factor=vae_downsample_factor(self.vae.config),
                         condition_spec=str(self.manifest.spec))
