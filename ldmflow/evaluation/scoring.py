"""The scores `ldmflow evaluate` reports, from images, probe readings and features already at hand.

Nothing here runs a sampler or talks to MLflow: workflows/evaluate.py generates the images, has the probe read
them, and logs what these functions return, so the scores can be tested on stand-in images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldmflow.data.conditions import ConditionSpec
from ldmflow.evaluation import distribution
from ldmflow.evaluation.adherence import Requests, condition_errors, shuffled_baseline
from ldmflow.evaluation.intervals import bootstrap_ci95


@dataclass(frozen=True)
class Scorer:
    """Condition errors in % of the training range, with their bootstrap intervals over the samples."""

    spec: ConditionSpec
    ranges: dict[str, tuple[float, float]]
    seed: int  # of the bootstrap draws and of the shuffled baseline's order

    def errors(self, requests: Requests, read: np.ndarray, prefix: str = "") -> dict[str, float]:
        def score(rows):
            return condition_errors(self.spec, requests.values[rows], requests.present[rows], read[rows], self.ranges)

        scores = score(np.arange(len(read)))
        scores.update(bootstrap_ci95(score, (len(read),), seed=self.seed))
        return {f"{prefix}{key}": value for key, value in scores.items()}

    def shuffled(self, requests: Requests, read: np.ndarray) -> dict[str, float]:
        """The readings against the requests in a fixed random order: what ignoring the conditions scores."""
        return {f"shuffled/{key}": value for key, value in shuffled_baseline(
            self.spec, requests.values, requests.present, read, self.ranges, self.seed).items()}


@dataclass(frozen=True)
class AdherenceReadings:
    """What the probe read from a conditioned model's samples, and what those readings are compared with."""

    requests: Requests  # what the samples were asked for
    samples: np.ndarray  # (N, D) readings of the samples at the evaluated guidance
    unguided: np.ndarray | None = None  # the same requests and seeds at guidance 1 (None: 1 was evaluated)
    truth: Requests | None = None  # what the real images were recorded with
    reconstructions: np.ndarray | None = None  # the real images through the model's VAE (None: no first stage)


def adherence_scores(scorer: Scorer, readings: AdherenceReadings) -> dict[str, float]:
    """The samples' condition errors, the shuffled baseline, `guidance1/...` and the ceiling the model's VAE
    sets (`recon/...`: its reconstructions of the real images, read against their recorded conditions)."""
    metrics = scorer.errors(readings.requests, readings.samples)
    metrics.update(scorer.shuffled(readings.requests, readings.samples))
    if readings.unguided is not None:
        metrics.update(scorer.errors(readings.requests, readings.unguided, "guidance1/"))
    if readings.reconstructions is not None:
        metrics.update(scorer.errors(readings.truth, readings.reconstructions, "recon/"))
    return metrics


def reconstruction_scores(real_images: np.ndarray, reconstructions: np.ndarray, *, features, batch_size: int,
                          seed: int, perceptual_weights) -> tuple[dict[str, float], str | None]:
    """A VAE's PSNR, SSIM, LPIPS and rFID/rKID (with `features`, else none), and what could not be had (LPIPS
    without its weights) or None."""
    import torch

    from ldmflow.evaluation.image_metrics import psnr, ssim

    reference, test = (torch.from_numpy(a).permute(0, 3, 1, 2) for a in (real_images, reconstructions))
    metrics, skipped = {"psnr": float(psnr(reference, test).mean()), "ssim": float(ssim(reference, test).mean())}, None
    try:
        metrics["lpips"] = distribution.lpips(real_images, reconstructions, batch_size, perceptual_weights)
    except distribution.Unavailable as error:
        skipped = f"LPIPS ({error})"
    if features is not None:
        metrics.update({f"r{key}" if key.startswith(("fid", "kid")) else key: value for key, value in
                        distribution.fid_kid(features, real_images, reconstructions, batch_size, seed).items()})
    return metrics, skipped
