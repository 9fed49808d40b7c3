"""The model-specific part of training that the loop (loop.py) calls: what a task must provide, and the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image


@dataclass(frozen=True)
class TrainingPlan:
    """The run's length, and LR schedules built like the model's (type, warm-up, steps counted per process)."""

    max_steps: int
    lr_scheduler: str
    warmup_steps: int
    num_processes: int

    def schedule(self, accelerator: Accelerator, optimizer, num_steps: int):
        """A prepared LR schedule of `num_steps` optimizer steps for `optimizer`."""
        from diffusers.optimization import get_scheduler

        return accelerator.prepare(get_scheduler(
            self.lr_scheduler, optimizer, num_warmup_steps=self.warmup_steps * self.num_processes,
            num_training_steps=num_steps * self.num_processes))


class Task:
    """A task provides `setup`, `loss` and `save`; the other hooks do nothing unless a task needs them."""

    name: str = "training"  # what progress lines call it
    metric_names: tuple[str, ...] = ()  # loss parts returned by `loss`, in this order
    unreadable_before_training: frozenset[str] = frozenset()  # images replaced while caching (reported at the end)
    non_finite_before_training: frozenset[str] = frozenset()  # images cached with NaN/inf pixels (reported too)
    latent_cache = None  # the on-disk LatentCache the training reads, if any (its key and folder go on the run)

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """What `end_of_epoch(validate=True)` returns; the first is the default --checkpoint_metric."""
        return ()

    def setup(self, accelerator: Accelerator) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
        """The model to train and its training dataset (before accelerate prepares them)."""
        raise NotImplementedError

    def after_prepare(self, accelerator: Accelerator, model: torch.nn.Module, plan: "TrainingPlan") -> None:
        """Called once the model is prepared (wrapped for DDP, on the device); `plan` says how long the run is
        and builds LR schedules like the model's for any other optimizer the task prepares."""

    def checkpoint_states(self) -> dict[str, object]:
        """Objects with `state_dict`/`load_state_dict` saved with every checkpoint (tensors and plain values)."""
        return {}

    def after_resume(self, accelerator: Accelerator) -> None:
        """Called after a checkpoint was (or was not) loaded."""

    def loss(self, model: torch.nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 scalar loss, (len(metric_names),) detached parts) through the prepared model; `step` is the
        number of optimizer steps taken before this one."""
        raise NotImplementedError

    def after_backward(self, accelerator: Accelerator) -> None:
        """Called after each micro-batch's backward, inside the loop's gradient-accumulation context (for a
        second model that trains on the same batch, such as a discriminator)."""

    def after_optimizer_step(self, model: torch.nn.Module, step: int) -> None:
        """Called after each finite optimizer step; `step` counts the optimizer steps taken, this one included."""

    def end_of_epoch(self, accelerator: Accelerator, model: torch.nn.Module, step: int, previews: bool,
                     validate: bool) -> tuple[dict[str, float], dict[str, Image.Image]]:
        """When `validate`, validation metrics (equal on every process); when `previews`, images to log."""
        return {}, {}

    def save(self, accelerator: Accelerator, model: torch.nn.Module, target_dir: Path) -> dict[str, float]:
        """Write the model to `target_dir` (main process; every process calls) and return metrics to log."""
        raise NotImplementedError
