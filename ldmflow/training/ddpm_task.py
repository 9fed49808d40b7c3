"""What the latent and legacy DDPM tasks share: noise schedule, EMA, the loss call, validation, previews."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image

from ldmflow.data.dataset import image_dataset
from ldmflow.data.manifest import Manifest
from ldmflow.evaluation.metric_names import DENOISE_LOSS, DENOISE_LOSS_EMA
from ldmflow.settings import DdpmSettings
from ldmflow.training.diffusion import build_noise_scheduler, diffusion_loss, diffusion_target
from ldmflow.training.prepare import derive_seed
from ldmflow.training.task import Task


class StridedEMA(EMAModel):
    """diffusers' EMAModel (foreach: one fused update for all tensors) updated every `every` optimizer steps with
    decay**every: the same averaging horizon and warm-up as an update every step, at 1/every of the cost."""

    def __init__(self, parameters, every: int = 1, **kwargs):
        super().__init__(parameters, foreach=True, **kwargs)
        self.every = every

    def get_decay(self, optimization_step: int) -> float:
        return super().get_decay(optimization_step) ** self.every

    def step(self, parameters) -> None:
        self.optimization_step += self.every - 1  # it counts optimizer steps, not updates
        super().step(parameters)


class DdpmTask(Task):
    """Base for DDPM tasks; subclasses provide `setup`, `denoiser`, `clean_sample`, `validation_sample`,
    `_preview` and `save`."""

    def __init__(self, settings: DdpmSettings, val_manifest: Manifest | None, clip_sample: bool = True):
        self.settings, self.val_manifest = settings, val_manifest
        self.noise_scheduler = build_noise_scheduler(settings, clip_sample)
        self.ema: EMAModel | None = None
        self._val_data = None

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        if self.val_manifest is None:
            return ()
        return (DENOISE_LOSS_EMA, DENOISE_LOSS) if self.settings.use_ema else (DENOISE_LOSS,)

    def after_prepare(self, accelerator: Accelerator, model, plan) -> None:
        """EMA of the unwrapped weights on the training device, saved and restored with every checkpoint."""
        if not self.settings.use_ema:
            return
        unwrapped = accelerator.unwrap_model(model)
        self.ema = StridedEMA(unwrapped.parameters(), every=self.settings.ema_update_every,
                              decay=self.settings.ema_max_decay, use_ema_warmup=True,
                              inv_gamma=self.settings.ema_inv_gamma, power=self.settings.ema_power,
                              model_cls=type(unwrapped), model_config=unwrapped.config)
        self.ema.to(accelerator.device)

    def checkpoint_states(self) -> dict[str, object]:
        return {"ema": self.ema} if self.ema is not None else {}

    def after_resume(self, accelerator: Accelerator) -> None:
        """A checkpoint's EMA loads onto the CPU; it must live where the weights are."""
        if self.ema is not None:
            self.ema.to(accelerator.device)

    def clean_sample(self, batch: dict) -> torch.Tensor:
        """(B, C, H, W) data the diffusion runs on (pixels or scaled latents)."""
        raise NotImplementedError

    def validation_sample(self, batch: dict) -> torch.Tensor:
        """Like `clean_sample`, without randomness (the posterior mode for latents)."""
        raise NotImplementedError

    def denoiser(self, model, batch: dict, drop_conditions: bool = True):
        """A callable (noisy, timesteps) -> prediction through `model`; training drops conditions at random."""
        raise NotImplementedError

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        clean = self.clean_sample(batch)
        loss = diffusion_loss(self.denoiser(model, batch), clean, self.noise_scheduler, self.settings.snr_gamma)
        return loss, loss.new_zeros(0)

    def after_optimizer_step(self, model, step: int) -> None:
        if self.ema is not None and step % self.settings.ema_update_every == 0:
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
    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool, validate: bool):
        unwrapped = accelerator.unwrap_model(model)
        metrics = {}
        if validate and self.val_manifest is not None:
            metrics[DENOISE_LOSS] = self.validation_loss(accelerator, unwrapped)
            if self.ema is not None:
                with self.ema_weights(unwrapped):
                    metrics[DENOISE_LOSS_EMA] = self.validation_loss(accelerator, unwrapped)
        if not (previews and accelerator.is_main_process):
            return metrics, {}
        with self.ema_weights(unwrapped):
            grid = self._preview(unwrapped, step)
        folder = Path(self.settings.output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"samples_step{step:07d}.png")
        return metrics, {"samples": grid}

    @torch.no_grad()
    def validation_loss(self, accelerator: Accelerator, unet) -> float:
        """Mean denoising loss on the val split over a fixed grid of timesteps, with noise fixed per image and
        timestep: comparable across epochs and runs, and the same however the images are sharded."""
        s = self.settings
        if self._val_data is None:
            self._val_data = image_dataset(self.val_manifest, s, training=False)
        scheduler = self.noise_scheduler
        grid = torch.linspace(0, scheduler.config.num_train_timesteps - 1, s.val_timesteps).round().long()
        positions = list(range(accelerator.process_index, len(self._val_data), accelerator.num_processes))
        totals = torch.zeros(2, device=accelerator.device)  # sum of per-image losses, count
        for start in range(0, len(positions), s.eval_batch_size):
            chunk = positions[start:start + s.eval_batch_size]
            batch = {key: value.to(accelerator.device) if torch.is_tensor(value) else value for key, value in
                     torch.utils.data.default_collate([self._val_data[i] for i in chunk]).items()}
            clean = self.validation_sample(batch).float()  # (B, C, H, W)
            predict = self.denoiser(unet, batch, drop_conditions=False)
            for k, timestep in enumerate(grid.tolist()):
                noise = torch.stack([torch.randn(clean.shape[1:], generator=torch.Generator().manual_seed(
                    derive_seed(s.seed, position, k))) for position in chunk]).to(clean.device)
                timesteps = torch.full((len(chunk),), timestep, device=clean.device, dtype=torch.long)
                with accelerator.autocast():
                    prediction = predict(scheduler.add_noise(clean, noise, timesteps), timesteps).float()
                target = diffusion_target(scheduler, clean, noise, timesteps)
                per_image = (prediction - target.float()).pow(2).mean(dim=(1, 2, 3))
                totals += torch.stack([per_image.sum(), torch.tensor(float(len(chunk)), device=clean.device)])
        totals = accelerator.reduce(totals, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1)).item()

    def _preview(self, unet, step: int) -> Image.Image:
        raise NotImplementedError
