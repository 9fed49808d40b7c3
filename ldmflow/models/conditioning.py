"""How physical conditions become the UNet's class-embedding input, and how the null condition is encoded.

Layout of the encoded vector (length `encoded_dim` = value dims + one presence flag per condition):

    [ normalised values of every condition ... | presence flag of every condition ]

A present condition contributes (value - mean) / std and flag 1. A missing condition contributes zeros and
flag 0. The null condition of classifier-free guidance is "every condition missing", i.e. the all-zero vector,
so a real zero (flag 1) never looks like "no condition" (flag 0), and a sample whose metadata lacks a value is
trained exactly like a dropped condition. This is also why the original README's sampling loop, which feeds
`torch.zeros(projection_class_embeddings_input_dim)`, draws unconditional samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldmflow.data.conditions import ConditionSpec, ConditionStats
from ldmflow.models.kinds import CONDITIONING_FILE


FAR_FROM_TRAINING_STDS = 6.0  # a requested value this far from the training values is an extrapolation


def _numbers(values) -> str:
    text = ", ".join(f"{float(v):.4g}" for v in values)
    return text if len(values) == 1 else f"[{text}]"


@dataclass(frozen=True)
class ConditionEncoder:
    """Normalises conditions with the training split's statistics and appends presence flags."""

    spec: ConditionSpec
    stats: ConditionStats
    # name -> (min, max) of each value dimension over the training values, what requests are checked against
    # (None for a model saved before it was recorded)
    trained_range: dict[str, tuple[list[float], list[float]]] | None = field(default=None, compare=False)
    # name -> probability of dropping that condition alone in training (--cond_dropout_per_condition); None for a
    # model saved before it was recorded. A request may leave out only the conditions dropped with probability > 0.
    dropout_per_condition: dict[str, float] | None = field(default=None, compare=False)

    @property
    def omittable(self) -> tuple[str, ...]:
        """The conditions a request may leave out: those trained with per-condition dropout."""
        return tuple(name for name in self.spec.names if (self.dropout_per_condition or {}).get(name, 0.0) > 0)

    @property
    def encoded_dim(self) -> int:
        return 0 if self.spec.is_empty else self.spec.value_dim + self.spec.num_conditions

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D,) mean, (D,) std and (D,) condition index of each value dimension, on `device`: built once per
        device and dtype, so encoding a batch makes no host-to-device copy and no host sync."""
        tables = self.__dict__.setdefault("_device_tables", {})  # a cache beside the frozen fields
        key = (str(device), dtype)
        if key not in tables:
            owner = torch.repeat_interleave(torch.arange(self.spec.num_conditions), torch.tensor(self.spec.dims))
            tables[key] = (torch.tensor(self.stats.mean, dtype=dtype, device=device),
                           torch.tensor(self.stats.std, dtype=dtype, device=device), owner.to(device))
        return tables[key]

    def encode(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, D) physical values and (B, K) 0/1 flags -> (B, D + K) UNet condition input."""
        mean, std, owner = self._tables(values.device, values.dtype)
        present = present.to(values.dtype)
        normalised = (values - mean) / std * present[:, owner]  # each value dimension's condition flag
        return torch.cat([normalised, present], dim=1)

    def far_from_training(self, values: np.ndarray, limit: float = FAR_FROM_TRAINING_STDS,
                          present: np.ndarray | None = None) -> str | None:
        """The first given condition of a (value_dim,) request (`present`: (K,) flags, default all) more than
        `limit` standard deviations from the training values, said with what the model was trained on; None when
        every value is within."""
        mean, std = np.asarray(self.stats.mean), np.asarray(self.stats.std)
        distance = np.abs(np.asarray(values, np.float64) - mean) / np.where(std > 0, std, 1.0)  # (value_dim,)
        given = np.ones(self.spec.num_conditions, bool) if present is None else np.asarray(present, bool)
        for (name, where), known in zip(self.spec.slices().items(), given):
            if known and (distance[where] > limit).any():
                low, high = (self.trained_range or {}).get(name) or (mean[where] - 3 * std[where],
                                                                        mean[where] + 3 * std[where])
                about = "" if self.trained_range and name in self.trained_range else "about "
                return (f"{name} = {_numbers(np.asarray(values)[where])} is {distance[where].max():.3g} standard "
                        f"deviations from the training data (mean {_numbers(mean[where])}, std "
                        f"{_numbers(std[where])}: trained on {about}{_numbers(low)} to {_numbers(high)})")
        return None

    def null(self, batch_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """(B, D + K) encoding of 'no condition' (all zeros)."""
        return torch.zeros(batch_size, self.encoded_dim, device=device, dtype=dtype)

    def drop(self, encoded: torch.Tensor, probability: float) -> torch.Tensor:
        """Replace each sample's conditions by the null condition with `probability` (classifier-free guidance)."""
        if probability <= 0:
            return encoded
        keep = torch.rand(encoded.shape[0], 1, device=encoded.device) >= probability  # (B, 1)
        return encoded * keep.to(encoded.dtype)

    def drop_each(self, encoded: torch.Tensor) -> torch.Tensor:
        """Drop each condition alone (its values and flag zeroed) with its `dropout_per_condition` probability, so
        the model learns every partial request; (B, D + K) in and out."""
        if not self.omittable:
            return encoded
        tables = self.__dict__.setdefault("_dropout_tables", {})  # built once per device, like `_tables`
        key = (str(encoded.device), encoded.dtype)
        if key not in tables:
            tables[key] = torch.tensor([self.dropout_per_condition.get(name, 0.0) for name in self.spec.names],
                                       dtype=encoded.dtype, device=encoded.device)
        probability = tables[key]  # (K,)
        _, _, owner = self._tables(encoded.device, encoded.dtype)
        keep = (torch.rand(encoded.shape[0], len(probability), device=encoded.device) >= probability)  # (B, K)
        keep = keep.to(encoded.dtype)
        return encoded * torch.cat([keep[:, owner], keep], dim=1)

    def encode_physical(self, conditions: list[dict[str, np.ndarray | None]], device=None) -> torch.Tensor:
        """Conditions in physical units (name -> value, None or absent = unknown) -> (B, D + K)."""
        values = np.zeros((len(conditions), self.spec.value_dim), dtype=np.float32)
        present = np.zeros((len(conditions), self.spec.num_conditions), dtype=np.float32)
        slices = self.spec.slices()
        for row, condition in enumerate(conditions):
            for index, name in enumerate(self.spec.names):
                value = condition.get(name)
                if value is not None:
                    values[row, slices[name]] = np.asarray(value, dtype=np.float32).reshape(-1)
                    present[row, index] = 1.0
        return self.encode(torch.from_numpy(values), torch.from_numpy(present)).to(device)

    def to_dict(self) -> dict:
        return {
            "condition_spec": str(self.spec),
            "stats": self.stats.to_dict(self.spec),
            "encoded_dim": self.encoded_dim,
            **({"trained_range": {name: {"min": low, "max": high} for name, (low, high) in self.trained_range.items()}}
               if self.trained_range else {}),
            **({"cond_dropout_per_condition": dict(self.dropout_per_condition)}
               if self.dropout_per_condition is not None else {}),
            "layout": "normalised values (value-mean)/std, then one presence flag per condition; null = zeros",
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONDITIONING_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ConditionEncoder":
        data = json.loads(Path(path).read_text())
        spec = ConditionSpec.parse(data["condition_spec"])
        ranges = data.get("trained_range") or {}
        trained = {name: (list(ranges[name]["min"]), list(ranges[name]["max"])) for name in spec.names
                   if isinstance(ranges.get(name), dict) and {"min", "max"} <= set(ranges[name])}
        dropout = data.get("cond_dropout_per_condition")
        dropout = {name: float(dropout.get(name, 0.0)) for name in spec.names} if isinstance(dropout, dict) else None
        return cls(spec, ConditionStats.from_dict(data["stats"], spec), trained or None, dropout)

    @classmethod
    def for_records(cls, spec: ConditionSpec, stats: ConditionStats, records,
                    dropout_per_condition: dict[str, float] | None = None) -> "ConditionEncoder":
        """The encoder of a training split (manifest records), with the range of values it holds and each
        condition's probability of being dropped alone recorded."""
        values = np.stack([record.conditions for record in records]).astype(np.float64)  # (N, value_dim)
        present = np.stack([record.present for record in records]).astype(bool)  # (N, K)
        trained = {}
        for index, (name, where) in enumerate(spec.slices().items()):
            rows = values[present[:, index], where]  # (n_present, dim)
            if len(rows):
                trained[name] = ([float(v) for v in rows.min(axis=0)], [float(v) for v in rows.max(axis=0)])
        return cls(spec, stats, trained or None, {name: float((dropout_per_condition or {}).get(name, 0.0))
                                                  for name in spec.names})
