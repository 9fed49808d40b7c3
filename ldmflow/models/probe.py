"""The condition probe: a small CNN that reads a manifest's conditions back from its images.

It is trained on the user's own training images (`ldmflow probe`), needs no downloaded weights, and serves
evaluation twice: it measures whether generated images show the conditions they were asked for, and its
pooled features are a dataset-specific feature space for FID/KID when Inception weights are not at hand.
It predicts normalised values ((value - mean) / std with the training statistics of its ConditionEncoder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ldmflow.models.architectures import norm_groups
from ldmflow.models.conditioning import ConditionEncoder
from ldmflow.models.kinds import CONDITIONING_FILE


class ConditionProbe(ModelMixin, ConfigMixin):
    """(B, 3, H, W) images in [-1, 1] -> (B, value_dim) normalised conditions; `features` -> (B, C)."""

    @register_to_config
    def __init__(self, value_dim: int, block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
                 resolution: int = 64):
        super().__init__()
        layers, previous = [], 3
        groups = norm_groups(tuple(block_out_channels))
        for channels in block_out_channels:  # each level halves the size
            layers += [torch.nn.Conv2d(previous, channels, 3, stride=2, padding=1),
                       torch.nn.GroupNorm(groups, channels), torch.nn.SiLU()]
            previous = channels
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(previous, value_dim)

    @property
    def num_features(self) -> int:
        return self.config.block_out_channels[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.resolution
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.body(images.float()).mean(dim=(2, 3))  # (B, C): global average pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ProbeFeatures(torch.nn.Module):
    """The probe's pooled features as a torchmetrics feature extractor: uint8 or [0, 1] images in."""

    def __init__(self, probe: ConditionProbe):
        super().__init__()
        self.probe, self.num_features = probe.eval(), probe.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.probe.features(images * 2 - 1)


class ProbeReader:
    """A trained probe with its encoder: images in, conditions in physical units out."""

    def __init__(self, probe: ConditionProbe, encoder: ConditionEncoder):
        self.probe, self.encoder = probe.eval(), encoder

    @classmethod
    def from_folder(cls, folder: str | Path, device="cpu") -> "ProbeReader":
        folder = Path(folder)
        return cls(ConditionProbe.from_pretrained(folder).to(device), ConditionEncoder.load(folder / CONDITIONING_FILE))

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, H, W, 3) images in [0, 1] -> (N, value_dim) conditions in physical units."""
        device = self.probe.device
        mean = torch.tensor(self.encoder.stats.mean, device=device)
        std = torch.tensor(self.encoder.stats.std, device=device)
        rows = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
            rows.append((self.probe(batch.permute(0, 3, 1, 2).float() * 2 - 1) * std + mean).cpu())
        return torch.cat(rows).numpy() if rows else np.zeros((0, self.encoder.spec.value_dim), np.float32)
