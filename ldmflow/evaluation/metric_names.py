"""Every metric name ldmflow validates, evaluates and compares on, and which way is better, in one place (as
tags.py is for tag names): the tasks, sweeps, compare, lineage and the registry read them here."""

from __future__ import annotations

from ldmflow.data.conditions import ConditionSpec
from ldmflow.evaluation.adherence import adherence_metric_names
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, VAE, Kind

VALIDATION, EVALUATION = "val/", "eval/"  # the prefixes of the training loop's and of `ldmflow evaluate`'s metrics
PSNR, SSIM, LPIPS = "val/psnr", "val/ssim", "val/lpips"  # a VAE's validation
RECONSTRUCTION_PREFIX = "val/recon/"  # a VAE's: the conditions its reconstructions keep, read back by the probe
DENOISE_LOSS, DENOISE_LOSS_EMA = "val/denoise_loss", "val/denoise_loss_ema"  # a DDPM's validation
_HIGHER_IS_BETTER = ("psnr", "ssim", "diversity")  # every other metric is a loss, an error or a distance
CONDITION_METRIC_MARKS = ("recon/", "condition_error", "_mae", "_angle_error")  # read back by the probe
CONDITION_ERROR_SUFFIXES = ("_mae_pct", "_angle_error_deg")  # a condition's error in % of its range, or degrees
HEADLINE_SCORES = ("fid", "rfid", "kid", "psnr", "ssim", "lpips")  # a version's description: then condition errors
KEY_METRICS = ("loss", PSNR, DENOISE_LOSS, DENOISE_LOSS_EMA, "latent_scaling_factor")  # `ldmflow models`' columns
VALIDATION_METRICS = {VAE: (PSNR, SSIM, LPIPS), LATENT_DDPM: (DENOISE_LOSS, DENOISE_LOSS_EMA),
                      LEGACY_DDPM: (DENOISE_LOSS, DENOISE_LOSS_EMA)}  # what each kind's validation can log
CONDITION_SCORED = (LATENT_DDPM,)  # the kinds whose validation and evaluation also score each condition
EVALUATION_SCORES = {VAE: ("psnr", "ssim", "lpips", "rfid", "rkid"), LATENT_DDPM: ("fid", "kid", "diversity"),
                     LEGACY_DDPM: ("fid", "kid", "diversity")}  # what `ldmflow evaluate` scores, without conditions


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` (a validation or evaluate metric) is better."""
    return any(word in metric for word in _HIGHER_IS_BETTER)


def is_condition_metric(metric: str) -> bool:
    """A metric that only the dataset's registered condition probe can compute."""
    return any(mark in metric for mark in CONDITION_METRIC_MARKS)


def stage_metrics(kind: Kind, spec: str) -> tuple[str, ...]:
    """The validation and evaluate metrics a stage can log (condition ones need the dataset's probe)."""
    scored = kind in CONDITION_SCORED and spec.strip().lower() != "none"
    conditions = adherence_metric_names(ConditionSpec.parse(spec)) if scored else ()
    validation = VALIDATION_METRICS[kind] + tuple(f"{VALIDATION}{name}" for name in conditions)
    return validation + tuple(f"{EVALUATION}{name}" for name in EVALUATION_SCORES[kind] + conditions)
