"""evaluation/metric_names.py: which way each metric is better, which need the probe, and what each kind logs."""

from __future__ import annotations

from ldmflow.evaluation.metric_names import (DENOISE_LOSS, EVALUATION, PSNR, VALIDATION, higher_is_better,
                                             is_condition_metric, stage_metrics)
from ldmflow.models.kinds import LATENT_DDPM, LEGACY_DDPM, VAE


def test_which_way_is_better():
    assert higher_is_better(PSNR) and higher_is_better("eval/ssim") and higher_is_better("eval/diversity")
    assert not higher_is_better(DENOISE_LOSS) and not higher_is_better("eval/fid")
    assert not higher_is_better("val/temperature_mae_pct")


def test_condition_metrics_are_told_apart():
    assert is_condition_metric("val/condition_error_pct") and is_condition_metric("val/recon/wind_angle_error_deg")
    assert not is_condition_metric(PSNR) and not is_condition_metric(DENOISE_LOSS)


def test_each_kind_logs_its_own_metrics_and_only_the_latent_ddpm_its_conditions():
    vae, latent = stage_metrics(VAE, "temperature:1"), stage_metrics(LATENT_DDPM, "temperature:1")
    assert PSNR in vae and f"{EVALUATION}rfid" in vae and not any("temperature" in name for name in vae)
    assert f"{VALIDATION}temperature_mae_pct" in latent and f"{EVALUATION}temperature_mae_pct" in latent
    assert stage_metrics(LEGACY_DDPM, "none") == (DENOISE_LOSS, "val/denoise_loss_ema", "eval/fid", "eval/kid",
                                                  "eval/diversity")
