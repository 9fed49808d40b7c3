"""What the latent and legacy DDPM tasks share: noise schedule, EMA, the loss call, preview bookkeeping."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image

from ldmflow.settings import DdpmSettings
from ldmflow.training.diffusion import build_noise_scheduler, diffusion_loss
from ldmflow.training.task import Task


class DdpmTask(Task):
    """Base for DDPM tasks; subclasses provide `setup`, `denoiser`, `clean_sample`, `_preview` and `save`."""

    def __init__(self, settings: DdpmSettings, clip_sample: bool = True):
        self.settings = settings
        self.noise_scheduler = build_noise_scheduler(settings, clip_sample)
        self.ema: EMAModel | None = None

    def after_prepare(self, accelerator: Accelerator, model) -> None:
        """EMA of the unwrapped weights on the training device, saved and restored with every checkpoint."""
        if not self.settings.use_ema:
            return
        unwrapped = accelerator.unwrap_model(model)
        self.ema = EMAModel(unwrapped.parameters(), decay=self.settings.ema_max_decay, use_ema_warmup=True,
                            inv_gamma=self.settings.ema_inv_gamma, power=self.settings.ema_power,
                            model_cls=type(unwrapped), model_config=unwrapped.config)
        self.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(self.ema)

    def after_resume(self, accelerator: Accelerator) -> None:
        """accelerate loads custom state onto the CPU; the EMA must live where the weights are."""
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def clean_sample(self, batch: dict) -> torch.Tensor:
        """(B, C, H, W) data the diffusion runs on (pixels or scaled latents)."""
        raise NotImplementedError

    def denoiser(self, model, batch: dict):
        """A callable (noisy, timesteps) -> prediction that goes through the prepared model."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.clean_sample(batch)
        loss = diffusion_loss(self.denoiser(model, batch), clean, self.noise_scheduler, self.settings.snr_gamma)
        return loss, loss.new_zeros(0)

    def after_optimizer_step(self, model) -> None:
        if self.ema is not None:
            self.ema.step(model.parameters())

    @contextlib.contextmanager
    def ema_weights(self, model: torch.nn.Module):
        """Temporarily load the EMA weights into `model` (for previews and saving), then put the live ones back."""
        if self.ema is None:
            yield model
            return
        self.ema.store(model.parameters())
        self.ema.copy_to(model.parameters())
        try:
            yield model
        finally:
            self.ema.restore(model.parameters())

    @torch.no_grad()
    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool):
        if not (previews and accelerator.is_main_process):
            return {}, {}
        unwrapped = accelerator.unwrap_model(model)
        with self.ema_weights(unwrapped):
            grid = self._preview(unwrapped, step)
        folder = Path(self.settings.output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"samples_step{step:07d}.png")
        return {}, {"samples": grid}

    def _preview(self, unet, step: int) -> Image.Image:
        raise NotImplementedError
