"""A dataset's VAE posteriors in the on-disk latent cache: found there, or encoded by all processes together.

Used by `latent-ddpm --cache_latents` and by `ldmflow cache-latents` (the same key, so the training finds what
the command built). The storage itself is ldmflow.data.latent_cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL

from ldmflow.data.dataset import image_dataset
from ldmflow.data.latent_cache import CachedLatents, CacheKey, LatentCache, ShardWriter
from ldmflow.data.manifest import Manifest
from ldmflow.errors import LdmflowError
from ldmflow.files import CACHE_ENV, cache_root, disk_problem, model_digest
from ldmflow.models.architectures import vae_downsample_factor
from ldmflow.progress import Progress

logger = logging.getLogger(__name__)


def cache_dir(settings, output_dir: str | None = None) -> Path:
    """--latent_cache_dir, else $LDMFLOW_CACHE/latents, else latent-cache beside the output folder, so that
    the runs of one output root (a pipeline's, a sweep's) share their caches."""
    if settings.latent_cache_dir:
        return Path(settings.latent_cache_dir).expanduser().absolute()
    if os.environ.get(CACHE_ENV):
        return cache_root().absolute() / "latents"
    if output_dir:
        return Path(output_dir).absolute().parent / "latent-cache"
    raise LdmflowError(f"Give --latent_cache_dir (then give a training the same folder), or set {CACHE_ENV}.")


def cache_key(settings, manifest: Manifest, vae_dir: Path) -> CacheKey:
    return CacheKey(vae_digest=model_digest(vae_dir), dataset_digest=manifest.files_digest,
                    resolution=settings.resolution, crop="center", flip=bool(settings.random_flip),
                    dtype=settings.latent_cache_dtype, preserve_input_precision=settings.preserve_input_precision)


@torch.no_grad()
def encode_posteriors(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 2c, h, w) posterior mean and log-variance, always in fp32 (fp16 VAEs overflow)."""
    with torch.autocast(vae.device.type, enabled=False):
        return vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.parameters


def open_latent_cache(settings, manifest: Manifest, vae: AutoencoderKL, vae_dir: Path, accelerator: Accelerator,
                      output_dir: str | None = None) -> tuple[LatentCache, CachedLatents]:
    """The cache of this VAE, data and transform: reused when complete, else built (once, under a lock, by all
    processes, each its shard) and then opened by every process."""
    if getattr(settings, "random_crop", False):
        logger.warning("--cache_latents encodes one center crop per image; --random_crop is ignored.")
    cache = LatentCache(cache_dir(settings, output_dir), cache_key(settings, manifest, vae_dir))
    try:
        with _staging(cache, accelerator) as staging:
            if staging is not None:
                _encode_shard(settings, manifest, vae, staging, cache, accelerator)
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    cache.publish(staging, len(manifest.records), accelerator.num_processes,
                                  _row_shape(settings, vae))
                    logger.debug("Wrote the latent cache %s.", cache.folder)  # "Encoding ..." named it
    except OSError as error:  # a read-only folder, a full disk: said in one line, the partial folder removed
        raise LdmflowError(f"Cannot write the latent cache in {cache.root}: {disk_problem(error, cache.root)}. "
                           "Set --latent_cache_dir to a writable folder with room for it.") from None
    accelerator.wait_for_everyone()
    problem = cache.problem()
    if problem is not None:
        raise LdmflowError(f"The latent cache {cache.folder} is not visible from this process ({problem}): "
                           f"on several nodes, set --latent_cache_dir (or {CACHE_ENV}) to a shared filesystem.")
    signs = torch.from_numpy(manifest.spec.flip_signs()) if settings.random_flip else None
    dataset = cache.open(signs, manifest.records)
    if staging is None:
        logger.info("Using the latent cache %s (%d images%s): nothing to encode.", cache.folder, len(dataset),
                    ", and their flips" if settings.random_flip else "")
    return cache, dataset


@contextlib.contextmanager
def _staging(cache: LatentCache, accelerator: Accelerator):
    """The folder every process writes its shard into, or None when the cache is complete. The main process
    decides, holding the key's lock until the cache is published; a failed build leaves no staging folder."""
    with contextlib.ExitStack() as held:
        staging = None
        if accelerator.is_main_process and cache.problem() is not None:
            held.enter_context(cache.build_lock())
            problem = cache.problem()  # another run may have built it while this one waited
            if problem is None:
                held.close()
            else:
                if problem != "absent":
                    logger.warning("The latent cache %s is unusable (%s): rebuilding it.", cache.folder, problem)
                staging = str(cache.staging_folder())
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            staging = broadcast_object_list([staging])[0]
        try:
            yield Path(staging) if staging else None
        except BaseException:
            if accelerator.is_main_process and staging:
                shutil.rmtree(staging, ignore_errors=True)
            raise


def _row_shape(settings, vae: AutoencoderKL) -> tuple[int, int, int]:
    size = settings.resolution // vae_downsample_factor(vae.config)
    return 2 * vae.config.latent_channels, size, size


def _encode_shard(settings, manifest: Manifest, vae: AutoencoderKL, staging: Path, cache: LatentCache,
                  accelerator: Accelerator) -> None:
    """This process's positions (its rank, then every num_processes-th), encoded in order into its shard."""
    writer = ShardWriter(staging, accelerator.process_index, accelerator.num_processes, len(manifest.records),
                         _row_shape(settings, vae), cache.key)
    images = image_dataset(manifest, settings, training=False)  # centre crops, never flipped at random
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, writer.positions),
                                         batch_size=settings.eval_batch_size,
                                         num_workers=settings.dataloader_num_workers)
    if accelerator.is_main_process:
        logger.info("Encoding %d images%s into the latent cache %s on %d process(es).", len(manifest.records),
                    " and their flips" if settings.random_flip else "", cache.folder, accelerator.num_processes)
    progress = Progress("caching latents", len(loader), unit="batch", enabled=accelerator.is_main_process)
    for batch in loader:
        pixels = batch["pixel_values"]  # (B, 3, R, R)
        params = encode_posteriors(vae, pixels).cpu()
        flipped = encode_posteriors(vae, pixels.flip(-1)).cpu() if settings.random_flip else None
        writer.append(params, flipped, batch["index"].tolist(), list(batch["unreadable"]), list(batch["non_finite"]))
        progress.update(1, len(pixels))
    progress.close()
    writer.close()
    non_finite = writer.non_finite
    if non_finite:  # the cache holds them as read; say so once, as training does for the images it reads
        logger.warning("%d image(s) encoded into the latent cache had NaN or infinite pixels, read as 0 (1 for +inf), "
                       "e.g. %s; `ldmflow check-manifest` lists them (and the runs trained from the cache: metric "
                       "non_finite_images).", len(non_finite), sorted(non_finite)[0])
