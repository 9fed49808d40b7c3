"""`ldmflow vae`: AutoencoderKL trained with MSE + L1 + kl_weight x KL, optionally LPIPS and a PatchGAN
discriminator (latent diffusion's first-stage loss); measures its latent scaling factor."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

from ldmflow.data.dataset import image_dataset, pixel_batches
from ldmflow.data.manifest import Manifest
from ldmflow.models.architectures import build_vae
from ldmflow.progress import Progress
from ldmflow.models.discriminator import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from ldmflow.models.attention import enable_memory_efficient_attention
from ldmflow.models.kinds import VAE
from ldmflow.sampling.grids import image_grid, to_pil
from ldmflow.files import publish_files, temporary_folder
from ldmflow.settings import VaeSettings
from ldmflow.evaluation import distribution
from ldmflow.evaluation.adherence import SplitConditions, adherence_metric_names
from ldmflow.evaluation.image_metrics import psnr, ssim
from ldmflow.evaluation.metric_names import LPIPS, PSNR, RECONSTRUCTION_PREFIX, SSIM
from ldmflow.errors import LdmflowError
from ldmflow.training.task import Task

logger = logging.getLogger(__name__)
NUM_PREVIEW_IMAGES = 8


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP (or compile) wrapper."""
    while hasattr(module, "module"):
        module = module.module
    return getattr(module, "_orig_mod", module)


def error_heatmap(reference: torch.Tensor, test: torch.Tensor, full_scale: float = 0.25) -> torch.Tensor:
    """(3, H, W) in [0, 1]: the per-pixel mean absolute error of two (3, H, W) images in [0, 1] on a black-red-
    yellow-white ramp, white at `full_scale` (fixed, so heatmaps of different steps compare)."""
    value = ((test - reference).abs().mean(0) / full_scale).clamp(0, 1)  # (H, W)
    return torch.stack([(3 * value).clamp(0, 1), (3 * value - 1).clamp(0, 1), (3 * value - 2).clamp(0, 1)])


def scaling_factor_sample(count: int, size: int, seed: int) -> list[int]:
    """A seeded random sample of image indices: a manifest sorted by anything must not skew the factor."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].tolist()


class VaeWithLoss(torch.nn.Module):
    """Encode -> sample -> decode in one forward, so the prepared (DDP) wrapper sees every trained call.

    `logvar` (trained only with --learn_logvar) is latent diffusion's learned output log-variance: the
    reconstruction loss is divided by exp(logvar), plus logvar. It lives here, not in the saved VAE.
    """

    def __init__(self, vae, learn_logvar: bool = False):
        super().__init__()
        self.vae = vae
        self.logvar = torch.nn.Parameter(torch.zeros(()), requires_grad=learn_logvar)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Posterior statistics in fp32 even under autocast: the KL sums thousands of terms.
        posterior = DiagonalGaussianDistribution(self.vae.encode(pixels).latent_dist.parameters.float())
        reconstruction = self.vae.decode(posterior.sample()).sample  # (B, 3, H, W) from latents (B, c, H/f, W/f)
        return reconstruction, posterior.kl()  # kl: (B,)


class VaeTask(Task):
    """The VAE's part of training: model, loss (and discriminator), validation and previews, scaling factor,
    saving."""

    name = VAE.name

    def __init__(self, settings: VaeSettings, manifest: Manifest, val_manifest: Manifest | None,
                 conditions: SplitConditions | None = None):
        """conditions: the val split's conditions and the dataset's probe, when one is registered: validation
        then also scores how well the reconstructions keep each condition (`val/recon/...`)."""
        self.settings, self.manifest, self.val_manifest = settings, manifest, val_manifest
        self.conditions = conditions if val_manifest is not None else None
        self._lpips = None  # built at the first validation; False when LPIPS cannot be had here
        self.perceptual = None
        if settings.perceptual_weight > 0:  # weights resolved now: before any MLflow run opens
            from ldmflow.models.perceptual import MIN_IMAGE_SIZE, load_lpips

            if settings.resolution < MIN_IMAGE_SIZE:
                raise LdmflowError(f"--perceptual_weight needs --resolution {MIN_IMAGE_SIZE} or more (AlexNet), "
                                   f"got {settings.resolution}.")
            self.perceptual = load_lpips(settings.perceptual_weights)
        self.discriminator = self.disc_optimizer = self.disc_schedule = None
        self._disc_loss = None  # the discriminator's loss on this micro-batch, for after_backward
        self.metric_names = ("mse", "l1", "kl") + (("perceptual",) if self.perceptual else ()) + \
            (("logvar",) if settings.learn_logvar else ()) + \
            (("g_adv", "adaptive_weight", "d_loss", "d_real", "d_fake") if settings.disc_weight > 0 else ())

    def setup(self, accelerator: Accelerator):
        s = self.settings
        vae = build_vae(s.block_out_channels, s.layers_per_block, s.resolution, s.latent_channels)
        enable_memory_efficient_attention(vae, s.enable_xformers_memory_efficient_attention)
        self.train_data = image_dataset(self.manifest, s, training=True)
        self.eval_data = image_dataset(self.val_manifest or self.manifest, s, training=False)
        if self.perceptual is not None:
            self.perceptual = self.perceptual.to(accelerator.device)
        return VaeWithLoss(vae, s.learn_logvar), self.train_data

    def after_prepare(self, accelerator: Accelerator, model, plan) -> None:
        """The discriminator, its Adam (betas 0.5, 0.9 as in latent diffusion) and LR schedule, prepared by
        accelerate: DDP-wrapped, and saved in every checkpoint beside the VAE (never in the saved VAE)."""
        s = self.settings
        if s.disc_weight == 0:
            return
        if s.disc_start >= plan.max_steps:
            raise LdmflowError(f"--disc_start {s.disc_start} is not before the end of this run ({plan.max_steps} "
                               "steps): the discriminator would never train. Lower it or train longer.")
        discriminator = PatchDiscriminator(num_layers=s.disc_layers)
        optimizer = torch.optim.Adam(discriminator.parameters(), lr=s.disc_learning_rate or s.learning_rate,
                                     betas=(0.5, 0.9))
        self.discriminator, self.disc_optimizer = accelerator.prepare(discriminator, optimizer)
        self.disc_schedule = plan.schedule(accelerator, self.disc_optimizer, plan.max_steps - s.disc_start)

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        pixels = batch["pixel_values"]
        reconstruction, kl = model(pixels)
        fake, real = reconstruction.float(), pixels.float()
        mse, l1, kl = F.mse_loss(fake, real), F.l1_loss(fake, real), kl.float().mean()
        parts = [mse, l1, kl]
        reconstruction_loss = mse + l1
        if self.perceptual is not None:
            perceptual = self.perceptual(fake, real).mean()
            reconstruction_loss = reconstruction_loss + s.perceptual_weight * perceptual
            parts.append(perceptual)
        if s.learn_logvar:
            logvar = _unwrap(model).logvar.float()
            reconstruction_loss = reconstruction_loss / logvar.exp() + logvar
            parts.append(logvar)
        loss = reconstruction_loss + s.kl_weight * kl
        if self.discriminator is not None:
            loss, adversarial = self._adversarial(model, loss, reconstruction_loss, fake, real, step)
            parts += adversarial
        return loss, torch.stack([part.detach().float() for part in parts])

    def _adversarial(self, model, loss, reconstruction_loss, fake, real,
                     step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """From --disc_start: the generator's adaptively weighted adversarial term, and the discriminator's
        loss on this batch (real vs the detached reconstruction) for after_backward. Zeros before."""
        zero = fake.new_zeros(())
        if step < self.settings.disc_start:
            self._disc_loss = None
            return loss, [zero] * 5
        kind, critic = self.settings.disc_loss, _unwrap(self.discriminator)
        critic.requires_grad_(False)  # the generator's term moves the VAE only
        g_adv = generator_loss(kind, critic(fake))
        critic.requires_grad_(True)
        last_layer = _unwrap(model).vae.decoder.conv_out.weight
        weight = adaptive_weight(reconstruction_loss, g_adv, last_layer) if torch.is_grad_enabled() else zero
        logits = self.discriminator(torch.cat([real, fake.detach()])).float()  # one call: one DDP forward
        real_logits, fake_logits = logits.chunk(2)
        self._disc_loss = discriminator_loss(kind, real_logits, fake_logits)
        total = loss + self.settings.disc_weight * weight * g_adv
        return total, [g_adv, weight, self._disc_loss, real_logits.mean(), fake_logits.mean()]

    def after_backward(self, accelerator: Accelerator) -> None:
        """The discriminator's update on the same batch; accelerate steps it only at the accumulation boundary."""
        if self._disc_loss is None:
            return
        accelerator.backward(self._disc_loss)
        self._disc_loss = None
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(self.discriminator.parameters(), self.settings.max_grad_norm)
        self.disc_optimizer.step()
        if accelerator.sync_gradients:
            self.disc_schedule.step()
        self.disc_optimizer.zero_grad(set_to_none=True)

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        if not self.val_manifest:
            return ()
        recon = () if self.conditions is None else \
            tuple(RECONSTRUCTION_PREFIX + name for name in adherence_metric_names(self.conditions.reader.encoder.spec))
        return (PSNR, SSIM) + recon

    @torch.no_grad()
    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool, validate: bool):
        vae = accelerator.unwrap_model(model).vae
        metrics = self._validate(accelerator, vae) if validate and self.val_manifest else {}
        images = {}
        if previews and accelerator.is_main_process:
            images["reconstructions"] = self._preview(vae, step)
            images["reconstruction_detail"] = self._detail(vae, step)
        return metrics, images

    def _perceptual(self, accelerator: Accelerator):
        """The LPIPS of val/lpips: the training loss's own, else one from local weights (never downloaded),
        else False (said once)."""
        if self._lpips is None:
            from ldmflow.models.perceptual import MIN_IMAGE_SIZE

            try:
                if self.settings.resolution < MIN_IMAGE_SIZE:
                    raise distribution.Unavailable(f"AlexNet needs {MIN_IMAGE_SIZE} px or more")
                self._lpips = self.perceptual if self.perceptual is not None else \
                    distribution.lpips_metric(self.settings.perceptual_weights).to(accelerator.device)
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
            perceptual = lpips(test * 2 - 1, reference * 2 - 1).sum() if lpips is not False else test.new_zeros(())
            totals += torch.stack([psnr(reference, test).sum(), ssim(reference, test).sum(), perceptual,
                                   torch.tensor(float(len(pixels)), device=accelerator.device)])
        totals = accelerator.reduce(totals, reduction="sum")
        count = max(totals[3].item(), 1.0)
        metrics = {PSNR: totals[0].item() / count, SSIM: totals[1].item() / count}
        if lpips is not False:
            metrics[LPIPS] = totals[2].item() / count
        if self.conditions is not None and accelerator.is_main_process:
            metrics.update({RECONSTRUCTION_PREFIX + key: value for key, value in self._condition_errors(vae).items()})
        return metrics

    def _condition_errors(self, vae) -> dict[str, float]:
        """The probe's condition errors on the val split's reconstructions (main process; the loop shares them)."""
        rows = []
        for pixels in pixel_batches(self.eval_data, list(range(len(self.eval_data))), self.settings.eval_batch_size):
            reconstruction = vae.decode(vae.encode(pixels.to(vae.device)).latent_dist.mode()).sample
            rows.append(((reconstruction.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
        return self.conditions.errors(np.concatenate(rows))

    def _preview(self, vae, step: int) -> Image.Image:
        """Inputs (top row, captioned) above their reconstructions (bottom row), saved to output_dir/images/."""
        count = min(NUM_PREVIEW_IMAGES, len(self.eval_data))
        pixels = next(pixel_batches(self.eval_data, list(range(count)), count)).to(vae.device)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        rows = torch.cat([pixels, reconstruction.float()]).clamp(-1, 1)  # (2N, 3, H, W)
        tiles = to_pil(((rows + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
        grid = image_grid(tiles, labels=["input"] * count + ["reconstruction"] * count, columns=count)
        folder = Path(self.settings.output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"reconstructions_step{step:07d}.png")
        return grid

    def _detail(self, vae, step: int) -> Image.Image:
        """The first validation image, its reconstruction and their error heatmap at full resolution (the grid
        shrinks nothing either, but this is where fine detail and its loss are compared), saved beside it."""
        pixels = next(pixel_batches(self.eval_data, [0], 1)).to(vae.device)
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.float()
        original, restored = ((pixels[0].float() + 1) / 2).clamp(0, 1), ((reconstruction[0] + 1) / 2).clamp(0, 1)
        tiles = torch.stack([original, restored, error_heatmap(original, restored)])  # (3, 3, H, W)
        labels = ["input", "reconstruction", "|error| (white: 0.25)"]
        detail = image_grid(to_pil(tiles.permute(0, 2, 3, 1).cpu().numpy()), labels=labels, columns=3)
        folder = Path(self.settings.output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        detail.save(folder / f"reconstruction_detail_step{step:07d}.png")
        return detail

    @torch.no_grad()
    def measure_scaling_factor(self, accelerator: Accelerator, vae) -> float:
        """1 / std of posterior samples over training batches (all processes), so scaled latents have unit variance."""
        batch_size = self.settings.train_batch_size
        plain = image_dataset(self.manifest, self.settings, training=False)
        chosen = scaling_factor_sample(len(plain), self.settings.scaling_factor_batches * batch_size,
                                       self.settings.seed)
        indices = chosen[accelerator.process_index::accelerator.num_processes]
        totals = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count; float64 on the CPU (MPS has none)
        progress = Progress("measuring the latent scaling factor", -(-len(indices) // batch_size), unit="batch",
                            enabled=accelerator.is_main_process)
        for pixels in pixel_batches(plain, indices, batch_size):
            progress.update(1, len(pixels))
            latents = vae.encode(pixels.to(accelerator.device)).latent_dist.sample().float()  # (B, c, h, w)
            partial = torch.stack([latents.sum(), (latents**2).sum()]).cpu().double()
            totals += torch.cat([partial, torch.tensor([float(latents.numel())], dtype=torch.float64)])
        progress.close()
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
            temporary = temporary_folder(target_dir, self.name)
            vae.save_pretrained(temporary, safe_serialization=True)
            publish_files(temporary, target_dir)
            logger.info("Saved the VAE to %s (latent scaling factor %.5f).", target_dir, scaling_factor)
        return {"latent_scaling_factor": scaling_factor}
