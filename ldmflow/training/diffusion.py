"""The DDPM training objective shared by the latent and legacy trainers (noise, timesteps, target, min-SNR)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from ldmflow.settings import DdpmSettings


def build_noise_scheduler(settings: DdpmSettings, clip_sample: bool = True) -> DDPMScheduler:
    """The training scheduler; saved beside the model so samplers rebuild the same noise schedule.

    clip_sample (clipping the predicted clean sample to [-1, 1]) suits pixels only: unit-variance latents
    have a third of their values outside that range, so the latent trainer turns it off. Zero terminal SNR
    comes with trailing timestep spacing, so samplers built from this config start from pure noise.
    """
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if settings.rescale_betas_zero_snr \
        else {}
    return DDPMScheduler(num_train_timesteps=settings.ddpm_num_steps, beta_schedule=settings.ddpm_beta_schedule,
                         prediction_type=settings.prediction_type, clip_sample=clip_sample, **zero_snr)


def diffusion_target(scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def diffusion_loss(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], clean: torch.Tensor,
                   scheduler: DDPMScheduler, snr_gamma: float | None) -> torch.Tensor:
    """Noise `clean` (B, C, H, W) at random timesteps and return the fp32 regression loss of the denoiser."""
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = diffusion_target(scheduler, clean, noise, timesteps)
    prediction = denoiser(noisy, timesteps).float()
    if snr_gamma is None:
        return F.mse_loss(prediction, target.float())
    # Min-SNR weighting (Hang et al. 2023): cap the weight of low-noise timesteps.
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma) / snr
    if scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_sample * weights).mean()
