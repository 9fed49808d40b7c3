"""The one signature every sampler shares (as k-diffusion's samplers do), so callers never ask which kind they hold.

`generate(conditions, *, num_images, guidance_scale, num_inference_steps, scheduler, seeds, batch_size, dtype,
progress, condition_guidance)`: conditions None means unconditional, guidance 1 means no classifier-free guidance
(condition_guidance: a weight per condition instead), image i depends
only on seeds[i] (and its conditions) whatever the batch size. `condition_spec` says what a sampler is
conditioned on: None when it takes no conditions at all (the legacy pixel DDPM).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

import numpy as np
import torch

from ldmflow.data.conditions import ConditionSpec
from ldmflow.errors import LdmflowError
from ldmflow.progress import Progress
from ldmflow.sampling.denoise import batches
from ldmflow.settings import SampleSettings

logger = logging.getLogger(__name__)
FLAT_STD = 1 / 1024  # an image whose pixels vary less than this is one flat colour: it carries no information

# The defaults of `ldmflow sample`, so a library call and the command sample alike.
GUIDANCE_SCALE = SampleSettings.guidance_scale
NUM_INFERENCE_STEPS = SampleSettings.num_inference_steps
SCHEDULER = SampleSettings.scheduler


class Sampler(Protocol):
    """What sample, evaluate, the pyfunc models, the training previews and the benchmarks call."""

    unet: torch.nn.Module
    scheduler_config: dict

    @property
    def condition_spec(self) -> ConditionSpec | None:
        """The conditions `generate` takes (an empty spec: an unconditional model that could take them);
        None: none at all."""

    @property
    def image_size(self) -> int:
        """The side, in pixels, of the images `generate` returns."""

    def check_conditions(self, conditions: list[dict],
                         condition_guidance: dict[str, float] | None = None) -> torch.Tensor | None:
        """The requested conditions encoded, or None if unconditional; one LdmflowError line if they (or the
        weights of guidance per condition) do not fit."""

    def set_dtype(self, name: str) -> None:
        """Switch the models to fp32, bf16 or fp16 (fp32 on the CPU)."""

    def generate(self, conditions: list[dict] | None = None, *, num_images: int | None = None,
                 guidance_scale: float = GUIDANCE_SCALE, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 scheduler: str = SCHEDULER, seeds: list[int] | None = None, batch_size: int | None = None,
                 dtype: str | None = None, progress: Progress | None = None,
                 condition_guidance: dict[str, float] | None = None) -> np.ndarray:
        """(N, H, W, 3) float32 images in [0, 1]. N = len(conditions), else num_images, else len(seeds), else 1;
        seeds default to 0..N-1; `dtype` None keeps the models' dtype; `progress` advances once per batch.
        `condition_guidance` (name -> weight) replaces `guidance_scale` by guidance per condition: the null
        prediction plus each given condition's own difference times its weight (`guidance_scale` where unnamed)."""


def image_seeds(conditions: list[dict] | None, num_images: int | None, seeds: list[int] | None) -> list[int]:
    """One seed per image: the count comes from the conditions, else num_images, else the seeds, else 1."""
    count = len(conditions) if conditions else (num_images or (len(seeds) if seeds else 1))
    seeds = list(seeds) if seeds is not None else list(range(count))
    if len(seeds) != count:
        raise LdmflowError(f"Got {len(seeds)} seeds for {count} images.")
    return seeds


def in_batches(count: int, batch_size: int | None, progress: Progress | None,
               generate: Callable[[range], np.ndarray]) -> np.ndarray:
    """`generate(rows)` for each batch of at most `batch_size` rows, concatenated; `progress` counts batches."""
    parts = []
    for rows in batches(count, batch_size):
        parts.append(generate(rows))
        if progress is not None:
            progress.update(1, len(rows))
    return np.concatenate(parts)


def check_generated(images: np.ndarray, guidance_scale: float) -> np.ndarray:
    """(N, H, W, 3) generated images, once they carry information: when every one is NaN or infinite or a single
    flat colour, refused in one line; when some are, a warning with their count (their NaN pixels read as 0)."""
    rows = images.reshape(len(images), -1)
    non_finite = ~np.isfinite(rows).all(axis=1)
    with np.errstate(invalid="ignore"):
        collapsed = ~non_finite & (rows.std(axis=1) < FLAT_STD)
    if not (non_finite.any() or collapsed.any()):
        return images
    what = (f"{int(non_finite.sum())} of {len(images)} generated images are NaN or infinite and "
            f"{int(collapsed.sum())} a single flat colour")
    hint = f" at guidance scale {guidance_scale:g} (models are guided at 1 to 20)" if guidance_scale > 20 else ""
    if (non_finite | collapsed).all():
        raise LdmflowError(f"{what}{hint}: they carry no information. Check the model (its validation metrics) "
                           "and the sampling settings.")
    logger.warning("%s%s; they are kept (NaN read as 0).", what, hint)
    return np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
