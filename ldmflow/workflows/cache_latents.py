"""`ldmflow cache-latents`: encode a dataset into the on-disk latent cache before the trainings that read it.

Run it under `accelerate launch` to encode on every GPU; a `latent-ddpm --cache_latents` with the same VAE,
data, resolution, flips, dtype and cache folder then starts training at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ldmflow.data.manifest import load_manifest
from ldmflow.settings import CacheLatentsSettings


def run_cache_latents(settings: CacheLatentsSettings) -> Path | None:
    """Build (or find) the cache; returns its folder on the main process (None on the others)."""
    from accelerate import Accelerator

    from ldmflow.training.latent_encoding import cache_dir, open_latent_cache
    from ldmflow.training.latent_task import load_vae
    from ldmflow.workflows.train import resolve_vae

    accelerator = Accelerator()
    manifest = load_manifest(settings.manifest_path, split=settings.split, condition_spec="none",
                             data_root=settings.data_root, allow_outside_root=settings.allow_outside_root,
                             max_image_pixels=settings.max_image_pixels)
    downloads = cache_dir(settings) / ".vae_download" / hashlib.sha256(settings.vae_uri.encode()).hexdigest()[:16]
    source = resolve_vae(settings.vae_uri, downloads, accelerator)
    vae = load_vae(source.local_dir, settings.vae_uri).to(accelerator.device)
    cache, _ = open_latent_cache(settings, manifest, vae, source.local_dir, accelerator)
    return cache.folder if accelerator.is_main_process else None
