"""The condition probe: a small CNN that reads a manifest's conditions back from its images.

It is trained on the user's own training images (`ldmflow probe`), needs no downloaded weights, and serves
evaluation twice: it measures whether generated images show the conditions they were asked for, and its
pooled features are a dataset-specific feature space for FID/KID when Inception weights are not at hand.
It predicts normalised values ((value - mean) / std with the training statistics of its ConditionEncoder). A
probe built with `condition_dims` predicts each vector condition v as an axis instead: the entries of
v v^T / |v| (scaled by the vector's largest std), which v and -v share and which turn continuously with v, so
an image that shows only the axis (stripes) asks for no jump; `AxisOutputs` converts both ways.
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
                 resolution: int = 64, norm: str = "group", condition_dims: tuple[int, ...] = ()):
        super().__init__()
        layers, previous = [], 3
        groups = norm_groups(tuple(block_out_channels))
        for channels in block_out_channels:  # each level halves the size
            layers += [torch.nn.Conv2d(previous, channels, 3, stride=2, padding=1), _norm(norm, groups, channels),
                       torch.nn.SiLU()]
            previous = channels
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(previous, AxisOutputs.width(condition_dims) if condition_dims else value_dim)

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


def _norm(norm: str, groups: int, channels: int) -> torch.nn.Module:
    """GroupNorm ("group", the first probes': it rescales each image's activations, so it loses how much of a
    feature an image has), BatchNorm ("batch": statistics of the training set, each image's amounts kept), or
    nothing ("none")."""
    if norm == "group":
        return torch.nn.GroupNorm(groups, channels)
    return _BatchNorm(channels) if norm == "batch" else torch.nn.Identity()


class _BatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d that normalises a training batch of one value per channel (one image, 1 x 1) with its
    running statistics instead of failing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class AxisOutputs:
    """The outputs of a probe with `condition_dims`: a scalar as (value - mean) / std; a vector v of d values as
    the d (d + 1) / 2 upper-triangle entries of v v^T / (|v| scale), scale its largest std. From those, v is
    the top eigenvector of the matrix times its eigenvalue (|v|), up to a sign no image of an axis can give."""

    def __init__(self, dims: tuple[int, ...], mean: torch.Tensor, std: torch.Tensor):
        self.dims, self.mean, self.std = tuple(dims), mean, std
        self.starts = np.cumsum((0, *self.dims))[:-1].tolist()

    @staticmethod
    def width(dims: tuple[int, ...]) -> int:
        return sum(d if d == 1 else d * (d + 1) // 2 for d in dims)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """(B, value_dim) physical values -> (B, width) targets."""
        parts = []
        for start, d in zip(self.starts, self.dims):
            v, std = values[:, start:start + d], self.std[start:start + d]
            if d == 1:
                parts.append((v - self.mean[start:start + d]) / std)
                continue
            rows, cols = torch.triu_indices(d, d)
            outer = v[:, :, None] * v[:, None, :] / v.norm(dim=1).clamp(min=1e-6)[:, None, None]  # (B, d, d)
            parts.append(outer[:, rows, cols] / std.max())
        return torch.cat(parts, dim=1)

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, width) probe outputs -> (B, value_dim) physical values (vectors: one of +v and -v)."""
        parts, at = [], 0
        for start, d in zip(self.starts, self.dims):
            std = self.std[start:start + d]
            if d == 1:
                parts.append(outputs[:, at:at + 1] * std + self.mean[start:start + d])
                at += 1
                continue
            rows, cols = torch.triu_indices(d, d)
            matrix = outputs.new_zeros(len(outputs), d, d)
            matrix[:, rows, cols] = outputs[:, at:at + len(rows)] * std.max()
            matrix = matrix + matrix.transpose(1, 2) - torch.diag_embed(torch.diagonal(matrix, dim1=1, dim2=2))
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())  # ascending
            parts.append((eigenvectors[:, :, -1] * eigenvalues[:, -1:].clamp(min=0)).to(outputs.dtype))
            at += len(rows)
        return torch.cat(parts, dim=1)


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
    """A trained probe with its encoder: images in, conditions in physical units out; `uri`: where it was loaded
    from (an evaluation logs it)."""

    def __init__(self, probe: ConditionProbe, encoder: ConditionEncoder, uri: str = ""):
        self.probe, self.encoder, self.uri = probe.eval(), encoder, uri

    @classmethod
    def from_folder(cls, folder: str | Path, device="cpu", uri: str = "") -> "ProbeReader":
        folder = Path(folder)
        return cls(ConditionProbe.from_pretrained(folder).to(device), ConditionEncoder.load(folder / CONDITIONING_FILE),
                   uri or str(folder))

    @torch.no_grad()
    def read(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, H, W, 3) images in [0, 1] -> (N, value_dim) conditions in physical units."""
        device = self.probe.device
        mean = torch.tensor(self.encoder.stats.mean, device=device)
        std = torch.tensor(self.encoder.stats.std, device=device)
        dims = tuple(self.probe.config.condition_dims)
        rows = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
            outputs = self.probe(batch.permute(0, 3, 1, 2).float() * 2 - 1)
            rows.append((AxisOutputs(dims, mean, std).decode(outputs) if dims else outputs * std + mean).cpu())
        return torch.cat(rows).numpy() if rows else np.zeros((0, self.encoder.spec.value_dim), np.float32)
