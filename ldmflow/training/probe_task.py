"""`ldmflow probe`: the condition probe (models/probe.py) trained on the manifest's own training images.

The loss is the squared error of normalised conditions over the values present in the metadata. A vector
condition is learned as an axis: the prediction may match the vector or its opposite (a stripe along the
wind looks the same both ways), so the evaluation reads directions as axes too (evaluation/adherence.py).
With --axis_outputs the probe predicts the axis itself (v v^T / |v|, models/probe.py) and the loss is the
squared error of that form; validation scores the read vectors the same way either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from ldmflow.data.dataset import image_dataset
from ldmflow.data.manifest import Manifest
from ldmflow.evaluation.adherence import condition_errors, manifest_ranges
from ldmflow.files import publish_files, temporary_folder
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.models.kinds import PROBE
from ldmflow.models.probe import AxisOutputs, ConditionProbe, ProbeReader
from ldmflow.settings import ProbeSettings
from ldmflow.training.task import Task

logger = logging.getLogger(__name__)


def _values(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([r.conditions for r in manifest.records]).astype(np.float32),
            np.stack([r.present for r in manifest.records]).astype(bool))


class ProbeTask(Task):
    """Model, axis-aware loss, validation error per condition (% of the training range), saving."""

    name = PROBE.name

    def __init__(self, settings: ProbeSettings, manifest: Manifest, val_manifest: Manifest | None):
        self.settings, self.manifest, self.val_manifest = settings, manifest, val_manifest
        spec = manifest.spec
        self.encoder = ConditionEncoder(spec, manifest.stats)
        self.ranges = manifest_ranges(manifest)
        self.vectors = [part for (_, dim), part in zip(spec.items, spec.slices().values()) if dim > 1]

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        return ("val/probe_loss",) if self.val_manifest is not None else ()

    def setup(self, accelerator: Accelerator):
        s = self.settings
        spec = self.manifest.spec
        probe = ConditionProbe(spec.value_dim, s.block_out_channels, s.resolution, s.norm,
                               spec.dims if s.axis_outputs else ())
        return probe, image_dataset(self.manifest, s, training=True)

    def _squared_errors(self, normalised: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, D) errors in units of each dimension's std; vectors scored against the closer of +v and -v."""
        mean = torch.tensor(self.encoder.stats.mean, device=values.device)
        std = torch.tensor(self.encoder.stats.std, device=values.device)
        physical = normalised.float() * std + mean
        errors = ((physical - values) / std) ** 2
        for part in self.vectors:
            flipped = ((physical[:, part] + values[:, part]) / std[part]) ** 2
            closer = flipped.sum(dim=1, keepdim=True) < errors[:, part].sum(dim=1, keepdim=True)
            errors[:, part] = torch.where(closer, flipped, errors[:, part])
        return errors

    def _axis_errors(self, outputs: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(B, width) squared errors of the axis form (models/probe.py), and each condition's number of outputs."""
        dims, stats = self.manifest.spec.dims, self.encoder.stats
        axes = AxisOutputs(dims, torch.tensor(stats.mean, device=values.device),
                           torch.tensor(stats.std, device=values.device))
        return (outputs - axes.encode(values)) ** 2, [AxisOutputs.width((d,)) for d in dims]

    def loss(self, model, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, present = batch["conditions"].float(), batch["present"].float()
        outputs = model(batch["pixel_values"]).float()
        errors, widths = self._axis_errors(outputs, values) if self.settings.axis_outputs else \
            (self._squared_errors(outputs, values), self.manifest.spec.dims)
        mask = torch.repeat_interleave(present, torch.tensor(widths, device=present.device), dim=1)
        return (errors * mask).sum() / mask.sum().clamp(min=1), errors.new_zeros(0)

    @torch.no_grad()
    def end_of_epoch(self, accelerator: Accelerator, model, step: int, previews: bool, validate: bool):
        if not (validate and self.val_manifest is not None):
            return {}, {}
        probe = accelerator.unwrap_model(model)
        data = image_dataset(self.val_manifest, self.settings, training=False)
        images = np.stack([((data[i]["pixel_values"].permute(1, 2, 0).numpy() + 1) / 2) for i in range(len(data))])
        read = ProbeReader(probe, self.encoder).read(images, self.settings.eval_batch_size)
        values, present = _values(self.val_manifest)
        spec = self.manifest.spec
        mask = np.repeat(present, spec.dims, axis=1)
        errors = self._squared_errors(torch.from_numpy((read - np.float32(self.encoder.stats.mean)) /
                                                       np.float32(self.encoder.stats.std)), torch.from_numpy(values))
        metrics = {"val/probe_loss": float((errors.numpy() * mask).sum() / max(mask.sum(), 1))}
        metrics.update({f"val/{key}": value for key, value in
                        condition_errors(spec, values, present, read, self.ranges).items()})
        return metrics, {}

    def save(self, accelerator: Accelerator, model, target_dir: Path) -> dict[str, float]:
        if accelerator.is_main_process:
            temporary = temporary_folder(target_dir, self.name)
            accelerator.unwrap_model(model).save_pretrained(temporary, safe_serialization=True)
            self.encoder.save(temporary)
            publish_files(temporary, Path(target_dir))
            logger.debug("Saved the condition probe to %s.", target_dir)
        return {}
