"""The one set of tiny sizes tests train with: 32 px images, one layer per block, no warm-up (seconds on a CPU).
Each test adds what it is about; a later repeat of a flag wins (click keeps the last value)."""

from __future__ import annotations

TINY_SIZES = ["--resolution", "32", "--train_batch_size", "4", "--layers_per_block", "1", "--lr_warmup_steps", "0"]


def as_project_params(arguments: list[str]) -> list[str]:
    """["--resolution", "32", ...] as `mlflow run` parameters: ["-P", "resolution=32", ...]."""
    names, values = arguments[0::2], arguments[1::2]
    return [part for name, value in zip(names, values) for part in ("-P", f"{name.removeprefix('--')}={value}")]
