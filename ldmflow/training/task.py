"""The model-specific part of training that the loop (loop.py) calls: what a task must provide, and the rest."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from PIL import Image


class Task:
    """A task provides `setup`, `loss` and `save`; the other hooks do nothing unless a task needs them."""

    metric_names: tuple[str, ...] = ()  # loss parts returned by `loss`, in this order

    def setup(self, accelerator: Accelerator) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
        """The model to train and its training dataset (before accelerate prepares them)."""
        raise NotImplementedError

    def after_prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Called once the model is prepared (wrapped for DDP, on the device)."""

    def after_resume(self, accelerator: Accelerator) -> None:
        """Called after a checkpoint was (or was not) loaded."""

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 scalar loss, (len(metric_names),) detached parts) through the prepared model."""
        raise NotImplementedError

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Called after each finite optimizer step."""

    def end_of_epoch(self, accelerator: Accelerator, model: torch.nn.Module, step: int,
                     previews: bool) -> tuple[dict[str, float], dict[str, Image.Image]]:
        """Validation metrics and, when `previews`, preview images to log at `step`."""
        return {}, {}

    def save(self, accelerator: Accelerator, model: torch.nn.Module) -> dict[str, float]:
        """Write the final model (main process) and return final metrics to log."""
        raise NotImplementedError
