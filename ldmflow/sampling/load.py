"""`load_sampler`: the one way from a saved folder to a sampler, as `DiffusionPipeline.from_pretrained` sits beside
the pipelines. Sample, evaluate and the benchmarks call it whatever the kind."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ldmflow.errors import LdmflowError
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, detect_kind, names
from ldmflow.models.saved_model import find_diffusers_folder, latent_ddpm_folders
from ldmflow.sampling.denoise import default_device
from ldmflow.sampling.latent import LatentSampler
from ldmflow.sampling.legacy import LegacySampler
from ldmflow.sampling.sampler import Sampler


def load_sampler(folder, dtype: str = "fp32", compile_unet: bool = False, device: str | None = None,
                 fetch: Callable[[str], Path] | None = None) -> Sampler:
    """A LatentSampler or LegacySampler for a training output folder or a downloaded ldmflow MLflow model, on
    `device` (default the GPU when there is one; cuDNN then picks the fastest kernels for the fixed sampling
    shapes). `fetch` (URI -> folder) downloads a latent DDPM's VAE again when its recorded folder is gone."""
    folder = Path(folder)
    device = device or default_device()
    kind = detect_kind(folder)
    if kind is LEGACY_DDPM:
        sampler = LegacySampler.from_folder(find_diffusers_folder(folder, LEGACY_DDPM), device, dtype)
    elif kind is LATENT_DDPM:
        folders = latent_ddpm_folders(folder, fetch)
        sampler = LatentSampler.from_folders(folders.unet_dir, folders.vae_dir, folders.scheduler_dir,
                                             folders.conditioning_path, device, dtype)
    else:
        raise LdmflowError(f"{folder} is a {kind.name} model; sampling takes a {names((LATENT_DDPM, LEGACY_DDPM))} "
                           "model.")
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    if compile_unet:
        sampler.unet.compile()
    return sampler
