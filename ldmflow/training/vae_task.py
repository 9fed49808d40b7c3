"""`ldmflow vae`: AutoencoderKL trained with MSE + L1 + kl_weight x KL; measures its latent scaling factor."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldmflow.data.dataset import image_dataset, pixel_batches
from ldmflow.data.manifest import Manifest
from ldmflow.models.architectures import build_vae
from ldmflow.models.attention import enable_memory_efficient_attention
from ldmflow.sampling.grids import image_grid, to_pil
from ldmflow.files import publish_files, temporary_folder
from ldmflow.settings import VaeSettings
from ldmflow.evaluation import distribution
from ldmflow.evaluation.image_metrics import psnr, ssim
from ldmflow.training.task import Task

logger = logging.getLogger(__name__)
NUM_PREVIEW_IMAGES = 8


def scaling_factor_sample(count: int, size: int, seed: int) -> list[int]:
    """A seeded random sample of image indices: a manifest sorted by anything must not skew the factor."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].tolist()


class VaeWithLoss(torch.nn.Module):
    """Encode -> sample -> decode in one forward, so the prepared (DDP) wrapper sees every trained call."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Posterior statistics in fp32 even under autocast: the KL sums thousands of terms.
        posterior = DiagonalGaussianDistribution(self.vae.encode(pixels).latent_dist.parameters.float())
        reconstruction = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W) from latents (B, c, H/f, W/f)
        return reconstruction, posterior.kl()  # kl: (B,)


class VaeTask(Task):
    """The VAE's part of training: model, loss, validation and previews, scaling factor, saving."""

    metric_names = ("mse", "l1", "kl")

    def __init__(self, settings: VaeSettings, manifest: Manifest, val_manifest: Manifest | None):
        self.settings, self.manifest, self.val_manifest = settings, manifest, val_manifest
        self._lpips = None  # built at the first validation; False when LPIPS cannot be had here

    def setup(self, accelerator: Accelerator):
        s = self.settings
        vae = build_vae(s.block_out_channels, s.layers_per_block, s.resolution, s.latent_channels)
        enable_memory_efficient_attention(vae, s.enable_xformers_memory_efficient_attention)
        self.train_data = image_dataset(self.manifest, s, training=True)
        self.eval_data = image_dataset(self.val_manifest or self.manifest, s, training=False)
        return VaeWithLoss(vae), self.train_data

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = batch["pixel_values"]
        reconstruction, kl = model(pixels)
        mse = F.mse_loss(reconstruction.float(), pixels.float())
        l1 = F.l1_loss(reconstruction.float(), pixels.float())
        kl = kl.float().mean()
        loss = mse + l1 + self.settings.kl_weight * kl
        return loss, torch.stack([mse, l1, kl]).detach()

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        return ("val/psnr", "val/ssim") if self.val_manifest else ()

    @torch.no_grad()
    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool, validate: bool):
        vae = accelerator.unwrap_model(model).vae
        metrics = self._validate(accelerator, vae) if validate and self.val_manifest else {}
        images = {}
        if previews and accelerator.is_main_process:
            images["reconstructions"] = self._preview(vae, step)
        return metrics, images

    def _perceptual(self, accelerator: Accelerator):
        """LPIPS when its backbone can be had (torchvision and its weights), else False (said once)."""
        if self._lpips is None:
            try:
                self._lpips = distribution.lpips_metric().to(accelerator.device)
            except distribution.Unavailable as error:
                if accelerator.is_main_process:
                    logger.info("val/lpips is skipped: %s.", error)
                self._lpips = False
        return self._lpips

    def _validate(self, accelerator: Accelerator, vae) -> dict[str, float]:
        """PSNR/SSIM (and LPIPS) of posterior-mode reconstructions on the val split, sharded over processes."""
        indices = list(range(accelerator.process_index, len(self.eval_data), accelerator.num_processes))
        lpips = self._perceptual(accelerator)
        totals = torch.zeros(4, device=accelerator.device)  # psnr sum, ssim sum, lpips sum, count
        for pixels in pixel_batches(self.eval_data, indices, self.settings.eval_batch_size):
            pixels = pixels.to(accelerator.device)
            reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
            reference, test = (pixels.float() + 1) / 2, ((reconstruction.float() + 1) / 2).clamp(0, 1)
            perceptual = lpips(test, reference).float() * len(pixels) if lpips else torch.zeros((), device=test.device)
            totals += torch.stack([psnr(reference, test).sum(), ssim(reference, test).sum(), perceptual.reshape(()),
                                   torch.tensor(float(len(pixels)), device=accelerator.device)])
        totals = accelerator.reduce(totals, reduction="sum")
        count = max(totals[3].item(), 1.0)
        metrics = {"val/psnr": totals[0].item() / count, "val/ssim": totals[1].item() / count}
        if lpips:
            metrics["val/lpips"] = totals[2].item() / count
        return metrics

    def _preview(self, vae, step: int) -> Image.Image:
        """Inputs (top row) above their reconstructions (bottom row), saved to output_dir/images/."""
        count = min(NUM_PREVIEW_IMAGES, len(self.eval_data))
        pixels = next(pixel_batches(self.eval_data, list(range(count)), count)).to(vae.device)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        rows = torch.cat([pixels, reconstruction.float()]).clamp(-1, 1)  # (2N, 3, H, W)
        tiles = to_pil(((rows + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        grid = image_grid(tiles, columns=count)
        folder = Path(self.settings.output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"reconstructions_step{step:07d}.png")
        return grid

    @torch.no_grad()
    def measure_scaling_factor(self, accelerator: Accelerator, vae) -> float:
        """1 / std of posterior samples over training batches (all processes), so scaled latents have unit variance."""
        batch_size = self.settings.train_batch_size
        plain = image_dataset(self.manifest, self.settings, training=False)
        chosen = scaling_factor_sample(len(plain), self.settings.scaling_factor_batches * batch_size,
                                       self.settings.seed)
        indices = chosen[accelerator.process_index::accelerator.num_processes]
        totals = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count; float64 on the CPU (MPS has none)
        for pixels in pixel_batches(plain, indices, batch_size):
            latents = vae.encode(pixels.to(accelerator.device)).latent_dist.sample().float()  # (B, c, h, w)
            partial = torch.stack([latents.sum(), (latents**2).sum()]).cpu().double()
            totals += torch.cat([partial, torch.tensor([float(latents.numel())], dtype=torch.float64)])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals.float().to(accelerator.device), reduction="sum").double().cpu()
        total, squares, count = totals.tolist()
        variance = squares / count - (total / count) ** 2
        return float(1.0 / max(variance, 1e-12) ** 0.5)

    def save(self, accelerator: Accelerator, model, target_dir: Path) -> dict[str, float]:
        vae = accelerator.unwrap_model(model).vae
        vae.eval()
        scaling_factor = self.measure_scaling_factor(accelerator, vae)
        if accelerator.is_main_process:
            vae.register_to_config(scaling_factor=scaling_factor)
            temporary = temporary_folder(target_dir, "vae")
            vae.save_pretrained(temporary, safe_serialization=True)
            publish_files(temporary, target_dir)
            logger.info("Saved the VAE to %s (latent scaling factor %.5f).", target_dir, scaling_factor)
        return {"latent_scaling_factor": scaling_factor}
